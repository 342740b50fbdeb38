"""Run folders: never overwritten, checkpoints written whole or not at all, logs that resume with the run.

Both recipes follow the same rules:

- a folder that holds a saved run is only continued (``--resume``), never
  started again (:func:`refuse_to_overwrite`);
- a checkpoint is written under a temporary name and renamed when complete,
  so a crash leaves the previous one (:func:`save_state_file` for the CIFAR
  recipe's single file, :func:`save_accelerate_state` for the fine-tuning
  recipe's folder);
- a resumed run restores the RNG state and its position in the data and
  drops the log lines written after the checkpoint (:class:`JsonlLog`).

One vocabulary for what a run folder holds (:data:`FINAL`, :data:`INITIAL`, :data:`CIFAR_CHECKPOINT`): the
resumable training state under ``checkpoints/`` (the fine-tuning recipe's ``checkpoints/step-N/``, the CIFAR
recipe's ``checkpoints/latest.pt``), the model the run ends with in ``final/`` (the scorer's checkpoint) and
the one it started from in ``initial/`` (WiSE-FT's alpha 0). Runs written before 2026-12-07 named them
``checkpoint/``, ``checkpoint-initial/`` and ``checkpoint.pt``; :func:`run_path` finds those too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..io import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "CIFAR_CHECKPOINT",
    "FINAL",
    "INITIAL",
    "JsonlLog",
    "RunPosition",
    "check_resume",
    "load_resumable_state",
    "load_state_file",
    "resume_differences",
    "refuse_to_overwrite",
    "resolve_resume",
    "rng_state",
    "run_path",
    "save_accelerate_state",
    "save_state_file",
    "set_rng_state",
]


#: the model a fine-tuning run ends with (the scorer's checkpoint), the one it started from (WiSE-FT's alpha
#: 0), and the CIFAR recipe's resumable checkpoint
FINAL, INITIAL, CIFAR_CHECKPOINT = "final", "initial", "checkpoints/latest.pt"
#: the names runs written before 2026-12-07 used
LEGACY_NAMES = {FINAL: "checkpoint", INITIAL: "checkpoint-initial", CIFAR_CHECKPOINT: "checkpoint.pt"}


def run_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``run_dir / name`` (one of :data:`FINAL`, :data:`INITIAL`, :data:`CIFAR_CHECKPOINT`), or an older run's
    name for it where only that exists (so that an older run is read, resumed and written where it was)."""
    run_dir = Path(run_dir)
    current, legacy = run_dir / name, run_dir / LEGACY_NAMES[name]
    return legacy if not current.exists() and legacy.exists() else current


def refuse_to_overwrite(run_dir: Path, resume: object, saved: Sequence[str]) -> None:
    """A run never overwrites another: a folder holding any of ``saved`` (or an older run's name for it, see
    :func:`run_path`) is only continued, with --resume.

    (A folder without them holds a run that stopped before its first save; it may start again.)
    """
    held = (run_path(run_dir, name) if name in LEGACY_NAMES else Path(run_dir) / name for name in saved)
    if resume is None and any(path.exists() for path in held):
        raise FileExistsError(f"run folder {run_dir} already holds a run: continue it with --resume latest, "
                              "or choose another --name or --output")


# ---------------------------------------------------------------------------
# One-file checkpoints (the CIFAR recipe)
# ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every random generator's state in types ``torch.load(weights_only=True)`` reads (tensors, tuples of
    numbers): a checkpoint holding it never needs the unpickler that can run code."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state_file(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` through a temporary file: a crash leaves the previous checkpoint. ``state`` holds only
    what :func:`load_state_file` reads without the code-running unpickler (tensors, numbers, strings,
    lists, tuples, dicts: :func:`rng_state`'s form)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint read with ``torch.load(weights_only=True)``: a file that needs more (code, numpy
    objects: a crafted file, or one an older halo-embed wrote) is refused, never executed."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects other than tensors and plain values, which are not loaded (they "
                         "could run code): a crafted file, or a checkpoint of halo-embed before 2026-12-07; start "
                         f"the run again (or, if you trust the file, load it yourself) [{str(error)[:120]}]") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is damaged or not a halo-embed training checkpoint: {error}") from error


def resume_differences(saved: dict[str, Any], config: Any, may_change: Sequence[str]) -> tuple[list[str], list[str]]:
    """How ``config`` (a recipe's dataclass) differs from the run's saved config: ``(refused, allowed)`` as
    ``--flag value (the run: value)`` strings; an option in ``may_change`` may differ on a resume, every
    other one defines the run."""
    from dataclasses import asdict

    current = asdict(config)
    refused, allowed = [], []
    for key in sorted(set(current) & set(saved) - {"resume"}):  # --resume itself always differs
        if current[key] != saved[key] and not (isinstance(current[key], (list, tuple))
                                               and list(current[key]) == list(saved[key] or [])):
            text = f"--{key.replace('_', '-')} {current[key]!r} (the run: {saved[key]!r})"
            (allowed if key in may_change else refused).append(text)
    return refused, allowed


def check_resume(saved: dict[str, Any], config: Any, may_change: Sequence[str], where: str) -> list[str]:
    """Raise when a resume would change what defines the run (naming every difference); return the allowed
    changes (for the log).

    Raises:
        ValueError: an option that defines the run differs from the run's (``where``: the saved config).
    """
    refused, allowed = resume_differences(saved, config, may_change)
    if refused:
        raise ValueError(f"--resume continues the run that was started, and {len(refused)} option(s) differ from "
                         f"{where}: {'; '.join(refused)}; give the run's values, or start a new run (--name). "
                         f"Options that may change on resume: {', '.join('--' + k.replace('_', '-') for k in may_change)}")
    return allowed


# ---------------------------------------------------------------------------
# Checkpoint folders through Accelerate (the fine-tuning recipe)
# ---------------------------------------------------------------------------


class RunPosition:
    """Where a run is: optimizer steps, epoch, batches into the epoch, broken images skipped so far.

    Saved as ``progress.json`` beside Accelerate's state (:func:`save_accelerate_state`) and read back from it
    (:func:`load_resumable_state`); not through ``register_for_checkpointing``, whose pickle Accelerate loads
    as a full pickle (a crafted one would run code).
    """

    def __init__(self) -> None:
        self.step, self.epoch, self.batches_in_epoch, self.skipped_images = 0, 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


def save_accelerate_state(accelerator, run_dir: Path, position: RunPosition, keep: int) -> Path:
    """``accelerator.save_state`` into a staging folder, renamed to ``checkpoints/step-N`` when complete.

    The ``keep`` newest are kept. (Accelerate's own rotation,
    ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)``,
    writes straight into the final folder, so a crash there leaves a
    half-written checkpoint that ``--resume latest`` would pick.)
    """
    target = run_dir / "checkpoints" / f"step-{position.step:07d}"
    staging = run_dir / "checkpoints" / f".staging-step-{position.step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(staging / "progress.json", position.state_dict())
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
            atomic_write_text(run_dir / "checkpoints" / "latest", target.name + "\n")
            for old in _checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # the previous checkpoint stays the newest complete one
        raise OSError(error.errno, f"cannot write the checkpoint {target}: {error.strerror or error}") from error
    accelerator.wait_for_everyone()
    return target


def _load_without_pickles(accelerator, path: Path) -> None:
    """``accelerator.load_state(path)`` without ``custom_checkpoint_*.pkl`` (written for registered objects by
    halo-embed before 2026-12-07, and unpickled in full by Accelerate): the other files
    are linked into a temporary folder that Accelerate reads instead; ``progress.json`` replaces them."""
    import tempfile

    pickles = sorted(path.glob("custom_checkpoint_*.pkl"))
    if not pickles:
        accelerator.load_state(str(path))
        return
    with tempfile.TemporaryDirectory(prefix="halo-embed-resume-") as view:
        for item in path.iterdir():
            if item not in pickles:
                os.symlink(item.resolve(), Path(view) / item.name)
        accelerator.load_state(view)


def load_resumable_state(accelerator, resume_dir: Path, run_dir: Path, resume: str, position: RunPosition) -> Path:
    """Restore model, optimizer, scheduler, RNG (Accelerate's files, read with ``weights_only=True``) and
    ``position`` (``progress.json``) from ``resume_dir``. With ``--resume latest`` a damaged checkpoint (a
    truncated weights or optimizer file) is reported on stderr by name and the next older complete one is
    used; returns the folder resumed from.

    Raises:
        ValueError: the checkpoint (every one, for ``latest``) cannot be loaded; the message names the file.
    """
    import sys

    candidates = [Path(resume_dir)]
    if resume == "latest":
        candidates += [p for p in reversed(_checkpoint_dirs(run_dir)) if p != Path(resume_dir)
                       and (p / "progress.json").is_file()]
    for number, path in enumerate(candidates):
        try:
            progress = json.loads((path / "progress.json").read_text())
            _load_without_pickles(accelerator, path)
        except Exception as error:  # a torn file fails in safetensors, torch.load or json, each its own way
            message = f"checkpoint {path} is damaged ({type(error).__name__}: {str(error)[:200]})"
            if number + 1 == len(candidates):
                raise ValueError(message + ("; no older complete checkpoint to use" if resume == "latest" else ""))
            print(f"{message}; using the previous one, {candidates[number + 1]}", file=sys.stderr)
            continue
        position.load_state_dict(progress)
        return path
    raise ValueError(f"no checkpoint to resume from in {run_dir}")


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint folder of ``--resume`` (a folder, or ``latest`` of ``run_dir``)."""
    if resume == "latest":
        pointer = run_dir / "checkpoints" / "latest"
        complete = [p for p in _checkpoint_dirs(run_dir) if (p / "progress.json").is_file()]
        if not pointer.is_file() and not complete:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}")
        path = run_dir / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else complete[-1]
        if not (path / "progress.json").is_file() and complete:  # the pointer names a folder that is gone
            path = complete[-1]
    else:
        path = Path(resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a training checkpoint (no progress.json)")
    return path


class JsonlLog:
    """Append-only JSON lines (``enabled``: on the main process only).

    A new run (``resume_at=None``) starts the file afresh; a resumed one drops
    the entries written after its checkpoint, whose ``position_key`` (``step``
    or ``epoch``) exceeds ``resume_at``, so the log reads as one run.
    """

    def __init__(self, path: Path, enabled: bool, resume_at: int | None, position_key: str = "step") -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_at is not None and path.exists():
            lines = path.read_text().splitlines()
            records = []
            for number, line in enumerate(lines, 1):
                if not line:
                    continue
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:
                    if number == len(lines):  # the line a kill cut off mid-write: dropped, as later lines are
                        continue
                    raise ValueError(f"{path}, line {number}, is not JSON: the log is damaged (a log line is "
                                     "written whole or cut off only at the end)") from None
            kept = [line for line, record in records if record.get(position_key, 0) <= resume_at]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and resume_at is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
