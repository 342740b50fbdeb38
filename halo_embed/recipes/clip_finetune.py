"""Fine-tune a CLIP model with HALO (or with CLIP's / SigLIP's loss, for comparison), driven by Accelerate.

    halo-embed finetune --model ViT-B-32 --pretrained openai --train-data train.csv --val-data val.csv
    accelerate launch -m halo_embed.recipes.clip_finetune --train-data ...        # several GPUs / machines
    halo-embed finetune --loss halo clip                                          # both, same init and data

What it produces: a run folder ``<logs>/<name>/`` with checkpoints you can
resume, ``log.jsonl`` and TensorBoard logs, the final model (for HALO a
checkpoint the scorer loads, ``final/``), and ``report.md`` /
``metrics.json`` with retrieval R@1/5/10 both ways and rejection of mismatched
pairs (shuffled captions, hard negatives, OOD images): AUROC, both FPR@95s,
AUPR, and the accuracy of HALO's built-in threshold next to the baseline's
tuned one. Measured numbers for the built-in data and real data are in README.md.

Method, in order:

1. Seeds first (python, numpy, torch); the data order is a function of
   ``(seed, epoch)`` and each sample's augmentation of ``(seed, draw)``, so a
   resumed run replays the same batches.
2. The backbone is built the way its library's users do
   (``open_clip.create_model_and_transforms(model, pretrained=...)`` or
   ``transformers.AutoModel.from_pretrained``; a timm image tower's weights from
   ``--pretrained-image``); towers are optionally locked, and a locked part
   is a fixed function whose outputs are computed once (``--feature-cache``).
3. HALO: the feature adapter's statistics are measured on the first training samples
   (each modality centred and scaled to unit mean square, identical on every
   process), then :class:`~halo_embed.clip.HALOCLIP` trains with
   :class:`~halo_embed.losses.PairedHALOLoss` (captions as the images'
   centroids, the origin as abstain candidate, symmetric, teacher-free targets,
   radial term; its ``K`` is the global batch size); with ``--normalization
   sphere`` no statistics are measured and the temperature starts at half the
   model's CLIP scale. Baselines: open_clip's
   ``ClipLoss`` / ``SigLipLoss`` on L2-normalised features with the model's
   own logit scale (and bias), reused, not rewritten.
4. AdamW without weight decay on gains, biases and temperatures; linear
   warm-up then cosine decay; gradient clipping; mixed precision from
   Accelerate; gradient accumulation over ``--accum-freq`` micro-batches
   (``accelerator.accumulate``), each micro-batch contrasting only its own
   pairs (its negatives do not cross micro-batches; open_clip_train caches
   the features of a group so that they do). CLIP's logit scale is clamped
   to ``[0, ln 100]`` after each step, as open_clip_train does.
5. Checkpoints every ``--save-every`` steps and at the end (written to a
   temporary folder and renamed); ``--resume`` restores model, optimizer,
   scheduler, RNG state and the position in the data.
6. HALO's accept / reject decision fitted on held-out pairs: ``--calibration-split`` of the training
   images never trains; at the end (and before the first step, and for each WiSE-FT alpha) the pair
   rule's temperature and bias are fitted on those images' aligned and mismatched pairs
   (:mod:`halo_embed.clip.decision`) and saved with the checkpoint.
7. Evaluation through :mod:`halo_embed.clip.evaluate` on the validation data (with the thresholds a user
   would choose on the calibration pairs beside HALO's decision).

Options and defaults: :mod:`~halo_embed.recipes.finetune_config`; data:
:mod:`~halo_embed.recipes.finetune_data`; run folders:
:mod:`~halo_embed.recipes.runs`; the model: :mod:`~halo_embed.recipes.finetune_model`; evaluation:
:mod:`~halo_embed.recipes.finetune_eval`; reports: :mod:`~halo_embed.recipes.finetune_report`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..data.shard_training import ShardLoader
from ..io import atomic_write_json
from .common import print_reports, recipe_main, warmup_cosine
from .finetune_config import AUTOCAST, RESUMABLE_OPTIONS, FinetuneConfig, add_arguments, configs_from_args, validate
from .finetune_data import (adapter_batches, calibration_pairs, load_pairs, split_calibration, training_loader,
                            zeroshot_data_for)
from .finetune_eval import calibrate_model, evaluate_run, evaluate_zeroshot_for
from .finetune_model import attach_feature_cache, build_model, optimizer_groups
from .finetune_report import write_comparison, write_run_report
from .runs import (FINAL, INITIAL, JsonlLog, RunPosition, load_resumable_state, refuse_to_overwrite, resolve_resume,
                   run_path, save_accelerate_state)

__all__ = ["FinetuneConfig", "build_model", "main", "optimizer_groups", "run", "train"]

#: ``halo-embed finetune`` (:mod:`halo_embed.cli`): the one-line help and the description
HELP = "fine-tune CLIP with HALO (or clip / siglip for comparison) using Accelerate"
CLI_DESCRIPTION = """``halo-embed finetune``: fine-tune a CLIP model with HALO (or compare losses), driven by Accelerate.

Runs on the built-in shapes data with a small built-in architecture when no
arguments are given. Under ``accelerate launch halo-embed finetune ...`` the
same command trains on several GPUs or machines. See
``python -m halo_embed.recipes.clip_finetune --help`` for the method.
"""

#: --report-to -> accelerate's log_with
TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "wandb,tensorboard": ["wandb", "tensorboard"],
            "tensorboard,wandb": ["wandb", "tensorboard"], "all": ["wandb", "tensorboard"], "none": None}
#: the zero-shot result of the model a run starts from, in its run folder (read again at the end, after a resume)
ZEROSHOT_BEFORE = "zeroshot_before.json"


def check_run_folder(config: FinetuneConfig) -> None:
    """A run never overwrites another (see :func:`~halo_embed.recipes.runs.refuse_to_overwrite`)."""
    refuse_to_overwrite(config.run_dir(), config.resume, ["checkpoints/latest", FINAL, "report.md"])


def train(config: FinetuneConfig) -> dict[str, Any]:
    """Run one fine-tuning (and its evaluation); returns the metrics. One run per run folder: the main
    process claims it (:func:`~halo_embed.io.claim`) before anything is written, for every process."""
    import contextlib

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

    from ..io import ClaimedError, claim_for

    # 1. seeds, processes, and a run folder that holds no other run
    validate(config)
    set_seed(config.seed)
    run_dir = config.run_dir()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without CUDA, accelerate joins a torchrun group only when told so
        mixed_precision=AUTOCAST.get(config.precision, "no"),
        gradient_accumulation_steps=config.accum_freq,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
        log_with=TRACKERS[config.report_to],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    with contextlib.ExitStack() as owned:
        refused = [None]
        if accelerator.is_main_process:
            try:
                owned.enter_context(claim_for(run_dir, f"run folder {run_dir}"))
            except ClaimedError as error:
                refused = [str(error)]
        if accelerator.num_processes > 1:  # every rank stops together, none waits at a barrier for the others
            refused = broadcast_object_list(refused)
        if refused[0] is not None:
            raise ClaimedError(refused[0])
        return _train_owned(accelerator, config)


def saved_run_config(config: FinetuneConfig, resume_dir) -> tuple[dict[str, Any], Path]:
    """The config of the run a resume continues: this run folder's, or that of the run ``--resume FOLDER``
    belongs to (``<run>/checkpoints/step-N``)."""
    for candidate in (config.run_dir() / "config.json", Path(resume_dir).parent.parent / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{candidate} is damaged (not valid JSON: {error})") from None
    return {}, config.run_dir() / "config.json"


def _train_owned(accelerator, config: FinetuneConfig) -> dict[str, Any]:
    from ..clip import save_checkpoint
    from .runs import check_resume

    run_dir = config.run_dir()
    check_run_folder(config)
    resume_dir, changed = None, []
    if config.resume:  # the run to continue, checked before anything is built or written
        resume_dir = resolve_resume(config.resume, run_dir)
        saved, where = saved_run_config(config, resume_dir)
        changed = check_resume(saved, config, RESUMABLE_OPTIONS, f"the run's ({where})")
        if config.wise_ft and not run_path(run_dir, INITIAL).is_dir():
            raise ValueError(f"--wise-ft needs the model the run started from, and {run_dir} has no "
                             "initial/ (the run was started without --wise-ft); resume without it")
    accelerator.wait_for_everyone()  # every rank has looked before the main one creates the folder

    # 2. data and model; the run folder is created only once both are usable
    train_source, calibration_source = split_calibration(config, load_pairs(config, "train"))
    calibration_data = calibration_pairs(calibration_source, config.seed)  # held out: never trained on
    load_pairs(config, "val")  # a missing or malformed --val-data is reported now, not after training
    zeroshot_data = zeroshot_data_for(config)  # a bad --zeroshot-data too
    model = build_model(config, accelerator.process_index, accelerator.num_processes)
    attach_feature_cache(model, config, training=True)
    loader = training_loader(config, train_source, model.backbone, accelerator)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is None or not (run_dir / "config.json").is_file():
            atomic_write_json(run_dir / "config.json", asdict(config))  # a resume never rewrites the run's
    if config.loss == "halo" and resume_dir is None and config.adapter_normalization() != "sphere":
        batches = adapter_batches(config, train_source, model.backbone)
        stats = model.fit_adapter(batches)
        accelerator.print(f"adapter statistics measured on {sum(len(pixels) for pixels, _ in batches)} samples: {stats}")

    # 3. optimisation, resumed where a checkpoint left it
    total_steps = config.max_steps or math.ceil(len(loader) / config.accum_freq) * config.epochs
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps)
    scheduler = warmup_cosine(optimizer, config.warmup, total_steps)
    if isinstance(loader, ShardLoader):  # each process already reads its own shards, to its device
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # the position travels as progress.json, not through register_for_checkpointing (whose file is unpickled
    # as a full pickle: a crafted one would run code)
    position = RunPosition()
    if resume_dir is not None:
        resume_dir = load_resumable_state(accelerator, resume_dir, run_dir, config.resume, position)
        accelerator.print(f"resumed from {resume_dir} at step {position.step}")
    elif accelerator.is_main_process:
        record_initial_model(accelerator.unwrap_model(model), config, accelerator.device, zeroshot_data,
                             calibration_data)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("finetune", config={k: v for k, v in asdict(config).items()
                                                  if isinstance(v, (int, float, str, bool))})
    log = JsonlLog(run_dir / "log.jsonl", accelerator.is_main_process, position.step if resume_dir else None)
    if resume_dir is not None:
        log.write({"step": position.step, "resumed": str(resume_dir), "changed": changed})

    # 4. the loop
    train_steps(accelerator, model, optimizer, scheduler, loader, position, total_steps, config, log)

    # 5. the scorer's checkpoint, evaluation and report
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    attach_feature_cache(unwrapped, config, training=False)  # evaluation images are deterministic
    metrics: dict[str, Any] = {"config": asdict(config), "steps": position.step,
                               "skipped_images": position.skipped_images,
                               "skipped_rows": len(getattr(train_source, "bad_rows", []))}
    if accelerator.is_main_process:
        calibration = calibrate_model(unwrapped, calibration_data, accelerator.device)
        save_checkpoint(unwrapped, run_path(run_dir, FINAL), extra={"step": position.step, "config": asdict(config)})
        metrics.update(evaluate_run(unwrapped, config, accelerator.device, calibration))
        if zeroshot_data is not None:
            before = run_dir / ZEROSHOT_BEFORE  # missing when --zeroshot-data was first given on a resume
            metrics["zeroshot"] = {"before": json.loads(before.read_text()) if before.is_file() else None,
                                   "after": evaluate_zeroshot_for(unwrapped, config, accelerator.device, zeroshot_data)}
        if config.wise_ft:
            from .wise_ft import sweep

            metrics["wise_ft"] = sweep(run_dir, config.wise_ft, accelerator.device, config=config)
        write_run_report(run_dir, config, metrics)
        if config.loss == "halo" and calibration_data is None:
            print("note: the accept / reject decision is HALO's constant abstain bias; --calibration-split 0.1 "
                  "fits it on held-out training images (README: Score image-text pairs)", file=sys.stderr)
    if unwrapped.backbone.feature_cache is not None:
        unwrapped.backbone.feature_cache.flush()
    accelerator.end_training()
    return metrics


def record_initial_model(model, config: FinetuneConfig, device, zeroshot_data, calibration_data=None) -> None:
    """What the run starts from: its zero-shot accuracy (``--zeroshot-data``) and, for ``--wise-ft``, the
    model itself (``initial/``: after the adapter's statistics are measured, before the first step),
    for HALO with its decision fitted on the calibration pairs (``--calibration-split``)."""
    from ..clip import save_checkpoint
    from ..io import atomic_write_json
    from .runs import rng_state, set_rng_state

    run_dir = config.run_dir()
    calibrate_model(model, calibration_data, device)
    if zeroshot_data is not None:
        state = rng_state()  # the evaluation's DataLoader draws a seed: training stays as without it
        before = evaluate_zeroshot_for(model, config, device, zeroshot_data)
        set_rng_state(state)
        atomic_write_json(run_dir / ZEROSHOT_BEFORE, before)
        print(f"zero-shot before fine-tuning: top-1 {100 * before['top1']:.2f} % on {before['images']} images")
    if config.wise_ft:
        save_checkpoint(model, run_path(run_dir, INITIAL), extra={"step": 0, "config": asdict(config)})


def train_steps(accelerator, model, optimizer, scheduler, loader, position: RunPosition, total_steps: int,
                config: FinetuneConfig, log: JsonlLog) -> None:
    """Optimizer steps until ``total_steps``: each over ``--accum-freq`` micro-batches, logged and saved."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=position.step, desc=f"finetune {config.loss}", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and config.progress))
    meter = StepMeter()
    model.train()
    saved_at = position.step
    clamp_logit_scale = getattr(accelerator.unwrap_model(model), "clamp_logit_scale", None)  # CLIP / SigLIP
    cache = accelerator.unwrap_model(model).backbone.feature_cache
    while position.step < total_steps:
        for batch in epoch_batches(accelerator, loader, position, config):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, parts = model(batch["pixels"], batch["tokens"], batch["image_ids"], return_parts=True)
                accelerator.backward(loss)  # divided by --accum-freq by accelerate
                meter.add(loss, parts, len(batch["captions"]) * accelerator.num_processes)
                if not accelerator.sync_gradients:
                    continue  # gradients of this micro-batch are accumulated, not yet synchronised or applied
                if config.grad_clip_norm:
                    meter.grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged)
                optimizer.step()
                if clamp_logit_scale is not None:
                    clamp_logit_scale()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            position.step += 1
            meter.end_step()
            bar.update(1)
            if position.step % config.log_every == 0 or position.step == total_steps:
                record = {"step": position.step, "epoch": position.epoch, "lr": step_lr,
                          "skipped_images": position.skipped_images, **meter.flush(accelerator)}
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=position.step)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if position.step % config.save_every == 0 or position.step == total_steps:
                save_accelerate_state(accelerator, config.run_dir(), position, config.keep_checkpoints)
                saved_at = position.step
                if cache is not None:  # a resumed run reads the features this one computed
                    cache.flush()
            if position.step >= total_steps:
                break
        epoch_done = position.batches_in_epoch == 0
        if epoch_done and config.save_frequency and position.epoch % config.save_frequency == 0 \
                and saved_at != position.step:  # --save-frequency: open_clip's checkpoint every n epochs
            save_accelerate_state(accelerator, config.run_dir(), position, config.keep_checkpoints)
            saved_at = position.step
    bar.close()


def epoch_batches(accelerator, loader, position: RunPosition, config: FinetuneConfig) -> Iterator[dict[str, Any]]:
    """The usable batches of the current epoch from ``position`` on; moves ``position`` along.

    Broken images are counted and skipped (``--strict-images``: an error); a
    batch with no readable image is skipped on one process (an error on
    several, whose batches must stay in step). The epoch counter advances only
    when the epoch is exhausted, so a run stopped at ``total_steps`` resumes
    mid-epoch.
    """
    from ..data.images import ImageLoadError

    loader.set_epoch(position.epoch)
    whole_epoch, usable, first_error = position.batches_in_epoch == 0, 0, None
    sharded = isinstance(loader, ShardLoader)
    if sharded:
        loader.resume_at(position.batches_in_epoch)
        batches = _until_any_process_runs_out(accelerator, loader)
    else:
        batches = accelerator.skip_first_batches(loader, position.batches_in_epoch) if position.batches_in_epoch \
            else loader
    for batch in batches:
        position.batches_in_epoch += 1
        if batch["errors"]:
            position.skipped_images += len(batch["errors"])
            first_error = first_error or batch["errors"][0]
            if config.strict_images:
                raise ImageLoadError(f"broken training image (--strict-images): {batch['errors'][0]}")
        if batch["pixels"] is None:
            if accelerator.num_processes > 1:
                raise ImageLoadError(f"every image of a batch is broken, e.g. {batch['errors'][0]}")
            continue  # (were it the epoch's last, its step's gradients join the next epoch's first step)
        usable += 1
        yield batch
    if whole_epoch and usable == 0:  # every image broken: another epoch would loop forever
        raise ImageLoadError(f"no training image of a whole epoch could be read, e.g. {first_error}")
    position.epoch += 1
    position.batches_in_epoch = 0


def _until_any_process_runs_out(accelerator, loader) -> Iterator[dict[str, Any]]:
    """The loader's batches while every process still has one: shards without resampling can hold fewer
    samples on one process than on another, and a process that stopped alone would leave the others
    waiting for its gradients. One tiny all-reduce per batch on several processes."""
    from ..distributed import every_process

    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if not every_process(batch is not None, accelerator.device):
            return
        yield batch


class StepMeter:
    """The last optimizer step's loss and parts (means over its micro-batches) and the throughput since the
    last log record. Values stay tensors on the device until a record is written: no host sync per step."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}
        self.micro_batches, self.samples, self.grad_norm = 0, 0, None
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], samples: int) -> None:
        for key, value in {"loss": loss, **parts}.items():
            value = value.detach().float().reshape(())
            self.totals[key] = self.totals[key] + value if key in self.totals else value
        self.micro_batches += 1
        self.samples += samples

    def end_step(self) -> None:
        self.last = {key: value / self.micro_batches for key, value in self.totals.items()}
        self.totals, self.micro_batches = {}, 0

    def flush(self, accelerator) -> dict[str, float]:
        """The last step's values (averaged over every process: the global batch's, not rank 0's shard)."""
        keys = sorted(self.last)
        values = torch.stack([self.last[k] for k in keys])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "mean")
        record = dict(zip(keys, values.tolist()))
        record["samples_per_s"] = self.samples / max(time.perf_counter() - self.started, 1e-9)
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self.samples, self.started = 0, time.perf_counter()
        return record


def run(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)
    for config in configs:  # a comparison fails before its first loss trains, not after
        check_run_folder(config)
    results = [train(config) for config in configs]
    print_reports(configs, results, write_comparison)
    skipped = sum(r["skipped_images"] for r in results), sum(r["skipped_rows"] for r in results)
    if any(skipped):  # exit status 1: done, but some input was rejected
        print(f"{skipped[0]} training image draw(s) and {skipped[1]} CSV row(s) were skipped (see the warnings "
              "above and skipped_images in log.jsonl)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return recipe_main("halo_embed.recipes.clip_finetune", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
