"""WiSE-FT sweep over a fine-tuning run: for each alpha, the interpolated model's retrieval and rejection on
the run's validation data, its zero-shot accuracy on ``--zeroshot-data``, and a checkpoint.

    halo-embed finetune ... --zeroshot-data imagenet-val/ --wise-ft 0 0.25 0.5 0.75 1     # at the end of a run
    halo-embed wise-ft runs/finetune-halo --alphas 0 0.25 0.5 0.75 1                      # on a finished run

The run folder holds ``initial/`` (the model before the first
step: for HALO after the adapter's statistics are measured; written when the run was
started with ``--wise-ft``) and ``final/`` (the fine-tuned model; an older run's ``checkpoint-initial/`` and
``checkpoint/`` are read too). The
sweep writes ``<output>/alpha-<alpha>/`` (a checkpoint per alpha: for HALO the
scorer loads it), ``wise_ft.json``, ``wise_ft.md`` and ``wise_ft.png`` (the
trade-off between the fine-tuning task's mean recall and the zero-shot
accuracy). An existing output folder is never overwritten: the next free name
(``wise_ft-2`` ...) is used.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch

from .finetune_config import FinetuneConfig
from .finetune_report import tradeoff_plot, wise_ft_table
from .runs import FINAL, INITIAL, run_path

__all__ = ["alpha_folder", "mean_recall", "sweep", "tradeoff_plot", "wise_ft_table"]

#: ``halo-embed wise-ft`` (:mod:`halo_embed.cli`): the one-line help and the description
HELP = "WiSE-FT: interpolate a run's initial and fine-tuned weights, evaluate and save each alpha"
CLI_DESCRIPTION = """``halo-embed wise-ft``: weight-space ensembling of a fine-tuning run's initial and fine-tuned models.

    halo-embed wise-ft runs/finetune-halo --alphas 0 0.25 0.5 0.75 1

For each alpha the model with weights ``(1 - alpha) * initial + alpha *
fine-tuned`` (Wortsman et al., 2022) is evaluated on the run's validation data
(retrieval, rejection) and its ``--zeroshot-data`` (zero-shot accuracy), and
saved as a checkpoint (HALO's load in ``halo-embed score``). The run must have
been started with ``--wise-ft`` (which keeps ``initial/``).
"""



def alpha_folder(alpha: float) -> str:
    """The checkpoint folder of one alpha: ``alpha-0.50`` for alphas with two decimals, else the float's own
    shortest exact spelling (``alpha-0.001``), so that two distinct alphas never share a folder."""
    return f"alpha-{alpha:.2f}" if round(alpha, 2) == alpha else f"alpha-{alpha!r}"


def mean_recall(retrieval: dict[str, float]) -> float:
    """The mean of R@1, R@5 and R@10 in both directions (one number for the trade-off plot)."""
    keys = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    return sum(retrieval[k] for k in keys) / len(keys)


def run_config(run_dir: Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` a run folder was trained with (its ``config.json``)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a halo-embed finetune run folder")
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in saved.items() if k in known})


def sweep(run_dir: str | Path, alphas: Sequence[float], device: str | torch.device = "cpu",
          output: str | Path | None = None, config: FinetuneConfig | None = None) -> dict[str, Any]:
    """Evaluate and save the WiSE-FT model of ``run_dir`` at each alpha; returns what ``wise_ft.json`` holds.

    Raises:
        FileNotFoundError: the run folder lacks ``config.json``, ``initial/`` or ``final/``.
        ValueError: an alpha outside ``[0, 1]``, or no alpha.
    """
    from ..clip.checkpoint import load_model, save_checkpoint
    from ..clip.evaluate import evaluate_alignment, view_of
    from ..clip.interpolation import interpolate_weights
    from ..io import atomic_write_json, unused_path
    from .finetune_data import calibration_data_for, eval_data_for, zeroshot_data_for
    from .finetune_eval import calibrate_model, evaluate_zeroshot_for
    from .finetune_model import apply_locks, attach_feature_cache

    run_dir = Path(run_dir)
    alphas = sorted({float(a) for a in alphas})
    if not alphas:
        raise ValueError("alphas must name at least one alpha in [0, 1]")
    if any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be in [0, 1], got {alphas}")
    config = config or run_config(run_dir)
    for name in (INITIAL, FINAL):
        if not run_path(run_dir, name).is_dir():
            hint = " (start the run with --wise-ft to keep the initial model)" if name == INITIAL else ""
            raise FileNotFoundError(f"{run_dir / name} is missing{hint}")
    initial = load_model(run_path(run_dir, INITIAL), device)
    finetuned = load_model(run_path(run_dir, FINAL), device)
    eval_data, zeroshot_data = eval_data_for(config), zeroshot_data_for(config)
    calibration_data = calibration_data_for(config)
    output = unused_path(Path(output) if output else run_dir / "wise_ft")  # created once every input is read
    output.mkdir(parents=True)
    points = []
    for alpha in alphas:
        model = interpolate_weights(initial, finetuned, alpha).eval()
        apply_locks(model.backbone, config)  # what was locked in training is identical at every alpha:
        attach_feature_cache(model, config, training=False)  # its features are computed once
        calibration = calibrate_model(model, calibration_data, device)  # each alpha's own decision
        result = evaluate_alignment(view_of(model), eval_data, device, calibration=calibration)
        point: dict[str, Any] = {
            "alpha": alpha, "retrieval": result["retrieval"], "mean_recall": mean_recall(result["retrieval"]),
            "auroc_all_mismatched": result["rejection"]["all mismatched"]["auroc"],
            "builtin_threshold_accuracy": result["rejection"]["all mismatched"].get("builtin_threshold_accuracy"),
            "rejection": {k: v for k, v in result["rejection"]["all mismatched"].items() if isinstance(v, float)},
            "zeroshot": evaluate_zeroshot_for(model, config, device, zeroshot_data),
            "checkpoint": alpha_folder(alpha),
        }
        save_checkpoint(model, output / point["checkpoint"], extra={"wise_ft_alpha": alpha, "run": str(run_dir)})
        points.append(point)
        zeroshot = point["zeroshot"]
        print(f"WiSE-FT alpha {alpha:.2f}: mean recall {100 * point['mean_recall']:.2f} %"
              + (f", zero-shot top-1 {100 * zeroshot['top1']:.2f} %" if zeroshot else ""), flush=True)
    if model.backbone.feature_cache is not None:
        model.backbone.feature_cache.flush()
    payload = {"run": str(run_dir), "loss": config.loss, "output": str(output), "alphas": points}
    atomic_write_json(output / "wise_ft.json", payload)
    _write_report(output, config, points)
    return payload


def _write_report(output: Path, config: FinetuneConfig, points: list[dict[str, Any]]) -> None:
    from ..io import atomic_write_text

    text = (f"# WiSE-FT: `{config.loss}`\n\nalpha 0 = the model before fine-tuning, 1 = after; validation data "
            f"`{config.val_data or config.train_data}`, zero-shot data `{config.zeroshot_data}`.\n\n"
            + wise_ft_table(points) + "\n")
    if points[0]["zeroshot"] is not None:
        tradeoff_plot(output / "wise_ft.png", {config.loss: points})
        text += "\n![trade-off](wise_ft.png)\n"
    atomic_write_text(output / "wise_ft.md", text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a halo-embed finetune run folder (with initial/ and final/)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="interpolation weights of the fine-tuned model, in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--output", help="output folder (default: <run>/wise_ft, or the next free name)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from .._validation import check_device

    from ..io import claim_for

    device = check_device("--device", args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    with claim_for(Path(args.run), f"run folder {args.run}"):  # not while the run trains, nor twice at once
        sweep(args.run, args.alphas, device, args.output)
    return 0
