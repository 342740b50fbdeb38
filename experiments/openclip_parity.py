"""Parity of ``halo-embed finetune --loss clip`` with open_clip's own trainer (``open_clip_train``, open-clip-torch 3.3).

What it produces: under a fresh folder ``runs/parity/<UTC time>/`` the train/val CSVs, one run folder per
trainer and seed, ``parity.json`` (every number) and ``parity.md``, a markdown table (trainer, seeds, final
training loss mean +- spread, R@1/R@5 image->text and text->image mean +- spread, seconds) plus the static
checks; the table is printed and also copied to ``runs/parity/parity.md``.

Data: ../shared/datasets/flickr8k-1000 (1000 images x 5 captions). Train: the first 800 images in
captions.csv order (4000 pairs); val: the last 200 images with all their 5 captions (gallery of 1000
captions). Both trainers train halo-embed's built-in ``halo-tiny-vit`` (64 px ViT, 4+4 layers, width 128)
from random weights on the same CSV with the same settings: batch 32, 1 epoch = 125 optimizer steps,
lr 5e-4, 10 warm-up steps then cosine to 0, AdamW (0.9, 0.98, 1e-6), weight decay 0.1, fp32, 1 process on
CPU, 0 loader workers, no gradient clipping (ours: ``--grad-clip-norm 0``, the same as ``none``).

Both checkpoints are evaluated with the same code: open_clip's ``checkpoints/epoch_<epochs>.pt`` is loaded with
``halo_embed.clip.load_backbone("open_clip", ..., pretrained=path)``, wrapped in ``ContrastiveCLIP`` and
scored with ``halo_embed.clip.evaluate.evaluate_alignment`` on ``finetune_data.eval_data_for``'s data; our
run's numbers are its ``metrics.json`` (same function), and its final weights are re-scored through the
same path as a cross-check.

Variant ``halo-clip1``: halo-embed's CLI with its default ``--grad-clip-norm 1.0`` (open_clip's default is no
clipping). (An earlier ``halo-ocrules`` variant patched open_clip_train's weight-decay rule and post-step
logit-scale clamp into halo-embed; both have been halo-embed's own behaviour since 2026-11-30, so it is gone.)

Hardware and time: 2 CPU cores, no GPU. Measured 0.6-1.5 s per step while the 2 cores were shared with 2-3
other jobs, i.e. 460-560 s per 125-step run (+ ~20 s evaluation); expect less on idle cores. The default
3 seeds x 2 trainers is 6 runs (~50 min shared); each extra variant adds one run per seed.
open_clip_train needs braceexpand and webdataset, which halo-embed does not install: the script pip-installs
them into runs/parity/_deps (PYTHONPATH of the open_clip runs only), never into the venv.

    .venv/bin/python experiments/openclip_parity.py                      # 3 seeds, both trainers
    .venv/bin/python experiments/openclip_parity.py --smoke              # halo-embed's side, 10 steps, generated data
    .venv/bin/python experiments/openclip_parity.py --seeds 0 1 --variants openclip halo halo-clip1
    .venv/bin/python experiments/openclip_parity.py --into runs/parity/<folder> --seeds 0 1 2    # add seed 2
    .venv/bin/python experiments/openclip_parity.py --into runs/parity/<folder> --reuse-only \
        --seeds 0 1 --variants openclip halo halo-clip1                  # re-tabulate finished runs only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _shared import add_common_options, datasets

REPO = Path(__file__).resolve().parents[1]
HALO_EMBED = str(Path(sys.executable).parent / "halo-embed")
PY = sys.executable
MODEL = "halo-tiny-vit"
VARIANTS = ("openclip", "halo", "halo-clip1")
TRAIN_IMAGES = 800


# ---------------------------------------------------------------------------------------------- data

def write_csvs(out: Path, data: Path, train_images: int = TRAIN_IMAGES) -> tuple[Path, Path]:
    """train.csv (the first ``train_images`` images, every caption) and val.csv (the rest, every caption):
    filepath,title."""
    rows = list(csv.DictReader(open(data / "captions.csv", newline="", encoding="utf-8")))
    images = list(dict.fromkeys(r["image"] for r in rows))
    train_set = set(images[:train_images])
    paths = {}
    for split, keep in (("train", lambda im: im in train_set), ("val", lambda im: im not in train_set)):
        path = out / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title"])
            for r in rows:
                if keep(r["image"]):
                    writer.writerow([str((data / "images" / r["image"]).resolve()), r["caption"]])
        paths[split] = path
    return paths["train"], paths["val"]


# ---------------------------------------------------------------------------------------------- trainers

def common_settings(args) -> dict:
    return dict(batch=args.batch_size, epochs=args.epochs, lr=args.lr, warmup=args.warmup, wd=args.wd,
                beta1=0.9, beta2=0.98, eps=1e-6)


def openclip_argv(args, seed: int, logs: Path, name: str, train_csv: Path) -> list[str]:
    s = common_settings(args)
    return ["--train-data", str(train_csv), "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", MODEL, "--batch-size", str(s["batch"]),
            "--epochs", str(s["epochs"]), "--lr", str(s["lr"]), "--warmup", str(s["warmup"]), "--wd", str(s["wd"]),
            "--beta1", str(s["beta1"]), "--beta2", str(s["beta2"]), "--eps", str(s["eps"]),
            "--lr-scheduler", "cosine", "--precision", "fp32", "--device", "cpu", "--workers", "0",
            "--seed", str(seed), "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
            "--report-to", "tensorboard", "--save-frequency", "0", "--accum-freq", "1"]
    # no --grad-clip-norm: open_clip's default is None (no clipping); no --val-data: evaluated below


def halo_log_flag() -> str:
    """``--log-every-n-steps`` if this checkout has it (a planned rename), else ``--log-every``."""
    help_text = subprocess.run([HALO_EMBED, "finetune", "--help"], capture_output=True,
                               text=True).stdout
    return "--log-every-n-steps" if "--log-every-n-steps" in help_text else "--log-every"


def halo_argv(args, seed: int, logs: Path, name: str, train_csv: Path, val_csv: Path, steps: int) -> list[str]:
    s = common_settings(args)
    return ["--loss", "clip", "--model", MODEL, "--train-data", str(train_csv), "--val-data", str(val_csv),
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(s["batch"]),
            "--max-steps", str(steps), "--lr", str(s["lr"]), "--warmup", str(s["warmup"]), "--wd", str(s["wd"]),
            "--beta1", str(s["beta1"]), "--beta2", str(s["beta2"]), "--eps", str(s["eps"]),
            "--grad-clip-norm", "0",  # falsy -> no clipping (train_steps: `if config.grad_clip_norm:`)
            "--precision", "fp32", "--workers", "0", "--accum-freq", "1", "--seed", str(seed),
            "--output", str(logs), "--name", name, halo_log_flag(), "1", "--save-every", str(steps),
            "--no-progress", "--eval-images", "200"]


def openclip_train_deps(root: Path) -> Path:
    """open_clip_train imports braceexpand and webdataset (its "training" extra), which halo-embed does not
    install: put them in a private folder under runs/ (on PYTHONPATH of the open_clip runs only)."""
    deps = root / "_deps"
    if not (deps / "braceexpand.py").exists() or not (deps / "webdataset").is_dir():
        cmd = [PY, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(deps), "braceexpand",
               "webdataset"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return deps


def finished(run_dir: Path, variant: str, args, seed: int, steps: int) -> bool:
    """A completed earlier run of this variant and seed with the same settings (else it must not exist)."""
    if not run_dir.exists():
        return False
    if variant == "openclip":
        params = dict(line.split(": ", 1) for line in (run_dir / "params.txt").read_text().splitlines() if ": " in line)
        done = (run_dir / "checkpoints" / f"epoch_{args.epochs}.pt").is_file()
        same = [params.get("seed"), params.get("epochs"), params.get("batch_size"), params.get("warmup"),
                params.get("lr"), params.get("wd")] == [str(seed), str(args.epochs), str(args.batch_size),
                                                        str(args.warmup), str(args.lr), str(args.wd)]
    else:
        config = json.loads((run_dir / "config.json").read_text())
        done = (run_dir / "metrics.json").is_file()
        same = [config["seed"], config["max_steps"], config["batch_size"], config["warmup"], config["lr"],
                config["wd"]] == [seed, steps, args.batch_size, args.warmup, args.lr, args.wd]
    if not (done and same):
        sys.exit(f"{run_dir} exists but is unfinished or has other settings: choose another --into or none")
    return True


def earlier_seconds(stdout_file: Path) -> float:
    """Wall time of an earlier run: its .seconds file, else its stdout file's birth to last write."""
    recorded = stdout_file.with_suffix(".seconds")
    if recorded.exists():
        return float(recorded.read_text())
    born = int(subprocess.run(["stat", "-c", "%W", str(stdout_file)], capture_output=True, text=True).stdout)
    return stdout_file.stat().st_mtime - born


def run_logged(cmd: list[str], log_file: Path, pythonpath: Path | None = None) -> float:
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(log_file, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"command failed (exit {rc}), see {log_file}")
    return seconds


def openclip_entry(argv: list[str]) -> int:
    """In-process open_clip_train with halo-embed's built-in configs registered (open_clip resolves --model
    through its config registry; ``add_model_config`` is how a new architecture is added)."""
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(REPO / "halo_embed" / "clip" / "model_configs")
    return main(argv) or 0


# ---------------------------------------------------------------------------------------------- logs

def openclip_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """step (1-based, as ours) -> loss, lr, logit_scale from open_clip's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    curve: dict[int, dict[str, float]] = {}
    for tag, key in (("train/contrastive_loss", "loss"), ("train/lr", "lr"), ("train/scale", "logit_scale")):
        for event in acc.Scalars(tag):
            curve.setdefault(event.step + 1, {})[key] = event.value  # open_clip's step is 0-based
    return curve


def halo_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    curve = {}
    for line in open(run_dir / "log.jsonl"):
        record = json.loads(line)
        if "loss" in record:
            curve[int(record["step"])] = {k: record[k] for k in ("loss", "lr", "logit_scale") if k in record}
    return curve


# ---------------------------------------------------------------------------------------------- evaluation

def eval_data(val_csv: Path):
    from halo_embed.recipes.finetune_config import FinetuneConfig
    from halo_embed.recipes.finetune_data import eval_data_for

    config = FinetuneConfig(model=MODEL, train_data=str(val_csv), val_data=str(val_csv), csv_img_key="filepath",
                            csv_caption_key="title", eval_images=200, seed=0, loss="clip")
    return eval_data_for(config)


def retrieval_of(model, data) -> dict[str, float]:
    from halo_embed.clip.evaluate import evaluate_alignment, view_of

    model.eval()
    return evaluate_alignment(view_of(model), data, "cpu")["retrieval"]


def eval_openclip_checkpoint(path: Path, data) -> dict[str, float]:
    from halo_embed.clip import ContrastiveCLIP, load_backbone

    return retrieval_of(ContrastiveCLIP(load_backbone("open_clip", MODEL, pretrained=str(path)), "clip"), data)


def eval_halo_state(run_dir: Path, data) -> dict[str, float]:
    """Cross-check: our final weights (accelerate state) through the same path as open_clip's checkpoint."""
    import torch
    from safetensors.torch import load_file

    from halo_embed.clip import ContrastiveCLIP, load_backbone

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = load_file(str(latest / "model.safetensors"))
    state = {k[len("backbone.model."):]: v for k, v in state.items() if k.startswith("backbone.model.")}
    torch.manual_seed(0)
    backbone = load_backbone("open_clip", MODEL)
    backbone.model.load_state_dict(state)
    return retrieval_of(ContrastiveCLIP(backbone, "clip"), data)


RECALLS = [("image_to_text_R@1", "R@1 i→t"), ("image_to_text_R@5", "R@5 i→t"),
           ("text_to_image_R@1", "R@1 t→i"), ("text_to_image_R@5", "R@5 t→i")]


# ---------------------------------------------------------------------------------------------- static checks

def static_checks(args, steps: int) -> dict:
    """Same initial weights and transforms for one seed; weight-decay groups; the two LR schedules."""
    import random

    import numpy as np
    import open_clip
    import torch
    from accelerate.utils import set_seed
    from open_clip_train.scheduler import cosine_lr

    from halo_embed.clip import parameter_groups
    from halo_embed.recipes.clip_finetune import build_model
    from halo_embed.recipes.common import warmup_cosine
    from halo_embed.recipes.finetune_config import FinetuneConfig

    out = {}
    # initial weights: open_clip_train.main.random_seed(seed, 0) then create_model_and_transforms vs ours
    open_clip.add_model_config(REPO / "halo_embed" / "clip" / "model_configs")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    oc_model, oc_train_tf, _ = open_clip.create_model_and_transforms(MODEL, "", precision="fp32", device="cpu",
                                                                     aug_cfg={}, output_dict=True)
    set_seed(0)
    ours = build_model(FinetuneConfig(model=MODEL, loss="clip", seed=0))
    a, b = oc_model.state_dict(), ours.backbone.model.state_dict()
    out["same_initial_weights_seed0"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out["same_train_transform"] = repr(oc_train_tf) == repr(ours.backbone.image_transform(train=True))
    out["train_transform"] = repr(oc_train_tf).replace("\n", " ")

    # weight decay: which parameters each rule decays (names relative to the open_clip model)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa
    oc_decay = {n for n, p in oc_model.named_parameters() if not exclude(n, p)}
    groups = parameter_groups(ours, 0.1)
    ids = {id(p) for p in groups[0]["params"]}
    our_decay = {n[len("backbone.model."):] for n, p in ours.named_parameters() if id(p) in ids}
    numel = dict((n, p.numel()) for n, p in oc_model.named_parameters())
    out["decayed_only_by_openclip"] = {n: numel[n] for n in sorted(oc_decay - our_decay)}
    out["decayed_only_by_halo"] = {n: numel[n] for n in sorted(our_decay - oc_decay)}

    # learning rate used at each optimizer step (0-based), both schedules
    p = torch.nn.Parameter(torch.zeros(1))
    opt_oc = torch.optim.AdamW([p], lr=args.lr)
    sched_oc = cosine_lr(opt_oc, args.lr, args.warmup, steps)
    lr_oc = [sched_oc(s) for s in range(steps)]
    opt_h = torch.optim.AdamW([p], lr=args.lr)
    sched_h = warmup_cosine(opt_h, args.warmup, steps)
    lr_h = []
    for _ in range(steps):
        lr_h.append(opt_h.param_groups[0]["lr"])
        opt_h.step()
        sched_h.step()
    out["lr_schedule_max_abs_diff"] = max(abs(x - y) for x, y in zip(lr_oc, lr_h))
    out["lr_first3_last2"] = {"openclip": lr_oc[:3] + lr_oc[-2:], "halo": lr_h[:3] + lr_h[-2:]}
    # gradient reaching logit_scale when it sits at the value of OpenAI's released weights (4.6052 > ln 100):
    # both forwards use exp() unclamped (halo-embed clamps the parameter after a step, as open_clip_train does),
    # so the two gradients must be equal
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    images, texts = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    images_n, texts_n = torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(texts, dim=-1)
    grads = {}
    for name, model_scale in (("halo (ContrastiveCLIP)", ours), ("openclip (exp())", None)):
        log_scale = torch.nn.Parameter(torch.tensor(4.6052))
        if model_scale is not None:
            with torch.no_grad():
                model_scale.logit_scale.fill_(4.6052)
            model_scale.loss(images_n, texts_n, model_scale.logit_scale.float().exp()).backward(retain_graph=True)
            grads[name] = float(model_scale.logit_scale.grad)
        else:
            ClipLoss()(images_n, texts_n, log_scale.exp()).backward(retain_graph=True)
            grads[name] = float(log_scale.grad)
    out["logit_scale_grad_at_4.6052"] = grads
    out["clip_loss_options"] = {
        "openclip (create_loss)": "ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True)",
        "halo (ContrastiveCLIP)": repr({k: getattr(ours.loss, k) for k in ("local_loss", "gather_with_grad",
                                                                            "world_size")})}
    return out


# ---------------------------------------------------------------------------------------------- report

def mean_spread(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {statistics.stdev(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarise(results: dict, last: int) -> str:
    lines = ["| trainer | seeds | final loss (mean of last %d steps) | R@1 i→t | R@5 i→t | R@1 t→i | R@5 t→i | "
             "seconds / run |" % last, "|---|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        if not runs:
            continue
        seeds = ",".join(str(r["seed"]) for r in runs)
        cells = [mean_spread([r["final_loss"] for r in runs])]
        cells += [mean_spread([r["retrieval"][k] for r in runs]) for k, _ in RECALLS]
        cells.append(f"{statistics.fmean(r['seconds'] for r in runs):.0f}")
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mean ± sample std over seeds [min, max]; retrieval on 200 val images x 1000 captions "
                 "(halo_embed.clip.evaluate.evaluate_alignment for every row).")
    # is the trainers' difference within the seed spread?
    if results.get("openclip") and results.get("halo"):
        lines.append("")
        lines.append("| metric | halo − openclip (means) | pooled seed std | |diff| / std |")
        lines.append("|---|---|---|---|")
        metrics = [("final loss", lambda r: r["final_loss"])] + \
                  [(label, (lambda k: lambda r: r["retrieval"][k])(k)) for k, label in RECALLS]
        for label, get in metrics:
            a = [get(r) for r in results["openclip"]]
            b = [get(r) for r in results["halo"]]
            diff = statistics.fmean(b) - statistics.fmean(a)
            std = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2) if min(len(a), len(b)) > 1 \
                else float("nan")
            lines.append(f"| {label} | {diff:+.3f} | {std:.3f} | {abs(diff) / std:.2f} |")
    return "\n".join(lines)


def curve_table(results: dict, steps: int) -> str:
    """Mean training loss over seeds in windows of steps, per trainer."""
    edges = [1, 11, 21, 51, 101, 151, 201, steps + 1]
    edges = sorted({e for e in edges if e <= steps + 1})
    head = "| trainer | " + " | ".join(f"steps {a}-{b - 1}" for a, b in zip(edges, edges[1:])) + " |"
    lines = [head, "|---" * (len(edges)) + "|"]
    for variant, runs in results.items():
        if not runs:
            continue
        cells = []
        for a, b in zip(edges, edges[1:]):
            vals = [r["curve"][s]["loss"] for r in runs for s in range(a, b) if s in r["curve"]]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_openclip":
        sys.exit(openclip_entry(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["openclip", "halo"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--last", type=int, default=20, help="final loss: mean of the last this many steps")
    parser.add_argument("--root", help="default: <--runs>/parity (parity-smoke)")
    add_common_options(parser)
    parser.add_argument("--into", help="an earlier output folder to add runs to (finished runs with the same "
                                       "settings are reused, not retrained)")
    parser.add_argument("--reuse-only", action="store_true",
                        help="with --into: report the finished runs only, train nothing")
    args = parser.parse_args()
    root = Path(args.root or Path(args.runs) / ("parity-smoke" if args.smoke else "parity"))
    train_images = TRAIN_IMAGES
    if args.smoke:  # halo-embed's side only (open_clip_train needs packages pip-installed under runs/), 10 steps
        args.seeds, args.variants, args.batch_size, args.last, train_images = [0], ["halo"], 16, 2, 32
    if args.into:  # add seeds/variants to an earlier output folder: its finished runs are reused, never redone
        out = Path(args.into)
        train_csv, val_csv = out / "train.csv", out / "val.csv"
    else:
        out = root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        while out.exists():  # never reuse an earlier run's folder
            out = out.with_name(out.name + "x")
        out.mkdir(parents=True)
        train_csv, val_csv = write_csvs(out, datasets(args) / "flickr8k-1000", train_images)
    n_train = sum(1 for _ in open(train_csv)) - 1
    steps = (n_train // args.batch_size) * args.epochs  # open_clip: num_batches (drop_last) * epochs
    print(f"output: {out}  ({n_train} training pairs, {steps} steps per run)", flush=True)

    deps = openclip_train_deps(root) if "openclip" in args.variants else None
    checks = static_checks(args, steps)
    print(json.dumps(checks, indent=1), flush=True)
    data = eval_data(val_csv)

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            name = f"{variant}-s{seed}"
            if variant == "openclip":
                cmd = [PY, __file__, "_openclip", *openclip_argv(args, seed, out, name, train_csv)]
            elif variant == "halo":
                cmd = [HALO_EMBED, "finetune",
                       *halo_argv(args, seed, out, name, train_csv, val_csv, steps)]
            else:  # halo-clip1: halo-embed's default clipping (1.0), everything else the same
                argv = halo_argv(args, seed, out, name, train_csv, val_csv, steps)
                argv[argv.index("--grad-clip-norm") + 1] = "1.0"
                cmd = [HALO_EMBED, "finetune", *argv]
            run_dir = out / name
            if args.reuse_only and not run_dir.exists():
                print(f"{name}: not run (--reuse-only)", flush=True)
                continue
            if finished(run_dir, variant, args, seed, steps):
                seconds = earlier_seconds(out / f"{name}.stdout")
                print(f"{name}: reusing the finished run in {run_dir}", flush=True)
            else:
                seconds = run_logged(cmd, out / f"{name}.stdout", deps if variant == "openclip" else None)
                (out / f"{name}.seconds").write_text(f"{seconds:.1f}\n")
            record = {"seed": seed, "seconds": seconds, "command": cmd}
            if variant == "openclip":
                record["curve"] = openclip_curve(run_dir)
                record["retrieval"] = eval_openclip_checkpoint(run_dir / "checkpoints" / f"epoch_{args.epochs}.pt",
                                                               data)
            else:
                record["curve"] = halo_curve(run_dir)
                metrics = json.loads((run_dir / "metrics.json").read_text())
                record["retrieval"] = metrics["eval"]["val"]["retrieval"]
                record["retrieval_rescored"] = eval_halo_state(run_dir, data)
            assert len(record["curve"]) == steps, f"{name}: {len(record['curve'])} logged steps, expected {steps}"
            record["final_loss"] = statistics.fmean(record["curve"][s]["loss"]
                                                    for s in range(steps - args.last + 1, steps + 1))
            record["final_logit_scale"] = record["curve"][steps].get("logit_scale")
            results[variant].append(record)
            print(f"{name}: {seconds:.0f} s, final loss {record['final_loss']:.4f}, "
                  f"logit scale {record['final_logit_scale']}, "
                  + ", ".join(f"{lab} {record['retrieval'][k]:.3f}" for k, lab in RECALLS), flush=True)

    # logged lr: ours is scheduler.get_last_lr() after the step (the next step's rate); open_clip's the step's own
    lr_check = {}
    if results.get("openclip") and results.get("halo"):
        oc, h = results["openclip"][0]["curve"], results["halo"][0]["curve"]
        lr_check = {"max |lr_halo[k] - lr_openclip[k+1]|": max(abs(h[k]["lr"] - oc[k + 1]["lr"])
                                                               for k in range(1, steps)),
                    "max |lr_halo[k] - lr_openclip[k]|": max(abs(h[k]["lr"] - oc[k]["lr"]) for k in range(1, steps))}
    rescored = {f"{v}-s{r['seed']}": max(abs(r["retrieval"][k] - r["retrieval_rescored"][k]) for k, _ in RECALLS)
                for v, runs in results.items() for r in runs if "retrieval_rescored" in r}

    table = summarise(results, args.last)
    md = [f"# open_clip_train vs halo-embed finetune --loss clip ({out.name})", "",
          f"{MODEL}, {n_train} Flickr8k-1000 training pairs, batch {args.batch_size}, {steps} steps "
          f"({args.epochs} epochs), lr {args.lr}, warm-up {args.warmup}, cosine, AdamW (0.9, 0.98, 1e-6), "
          f"wd {args.wd}, fp32, CPU, no clipping; seeds {args.seeds}.", "", table, "",
          "Training loss, mean over seeds by step window:", "", curve_table(results, steps), "",
          "Static checks:", "", "```", json.dumps(checks, indent=1), "```", "",
          f"Logged lr alignment (seed {args.seeds[0]}): `{json.dumps(lr_check)}`", "",
          f"Our final weights re-scored through open_clip's evaluation path, max |diff| vs metrics.json: "
          f"`{json.dumps(rescored)}`", ""]
    text = "\n".join(md)
    (out / "parity.md").write_text(text)
    (root / "parity.md").write_text(text)
    serial = {v: [{**r, "curve": {str(k): c for k, c in r["curve"].items()}} for r in runs]
              for v, runs in results.items()}
    (out / "parity.json").write_text(json.dumps({"checks": checks, "results": serial, "lr_check": lr_check,
                                                 "rescored": rescored}, indent=1, default=str))
    print()
    print(text)
    print(f"written: {out / 'parity.md'}, {root / 'parity.md'}")


if __name__ == "__main__":
    main()
