"""HALO vs CLIP's loss from the real pretrained start (``lit_pretrain.py``), over seeds: retrieval, rejection
with the built-in decision, zero-shot before and after, WiSE-FT, calibration of p(aligned).

Every run is ``halo-embed finetune`` from ``local-dir:runs/lit/lit-effnet-minilm`` on Flickr8k-1000 (800
training images x 5 captions, 200 validation images), with ``--calibration-split 0.1`` (80 training images
held out for the decision and for the thresholds a user would choose; every variant trains on the same 720),
SVHN and MNIST as OOD images, CIFAR-10 test as ``--zeroshot-data`` and ``--wise-ft 0 0.25 0.5 0.75 1``.
Variants (same data, steps and seeds):

- ``halo-sphere``: HALO, ``--normalization sphere`` (the temperature starts at half the model's CLIP scale);
- ``halo-fixed``: HALO with the adapter's default (``fixed``: centred and scaled by training statistics);
- ``clip``: CLIP's loss, the model's logit scale learnt;
- ``clip-frozen``: CLIP's loss, the scale held at HALO's effective value (``2 g`` of ``halo-sphere``'s start).

Settings: ``heads`` (both towers locked, only the projections train: the towers' features come from the
shared feature cache) and ``partial`` (``--preset small-data``: the image tower's last 2 groups train).
After the runs, ``posthoc`` scores each run's checkpoints on the 50 Tiny-ImageNet classes the pretrained
model never saw and measures a cosine threshold carried over from another data set (the best threshold on
Tiny-ImageNet class-prompt pairs, applied to Flickr pairs); ``report`` writes the tables (mean and sample
std over seeds) to ``<out>/report-<setting>.md`` and ``<out>/summary-<setting>.json``.

    .venv/bin/python experiments/real_start.py run --setting heads --seeds 0 1 2
    .venv/bin/python experiments/real_start.py posthoc report
    .venv/bin/python experiments/real_start.py run posthoc report --smoke   # generated data, random towers (the suite)

A run whose ``report.md`` exists is skipped, one with a folder but no report is resumed (``--resume latest``).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from _shared import add_common_options, cifar10, datasets, flickr_csvs

from halo_embed.recipes.runs import FINAL, INITIAL, run_path

VARIANTS = {
    "halo-sphere": ["--loss", "halo", "--normalization", "sphere"],
    "halo-fixed": ["--loss", "halo", "--normalization", "fixed"],
    "clip": ["--loss", "clip"],
    "clip-frozen": ["--loss", "clip", "--logit-scale", "{scale}"],
}
SETTINGS = {
    "heads": ["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm", "--train-augment", "none",
              "--lr", "1e-3", "--warmup", "20", "--epochs", "10", "--batch-size", "64"],
    "partial": ["--preset", "small-data", "--lock-image-freeze-bn-stats", "--lock-text", "--lock-text-freeze-layer-norm"],
}
ALPHAS = ["0", "0.25", "0.5", "0.75", "1"]
TEMPLATE = "a photo of a {}."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", choices=("run", "posthoc", "report"))
    add_common_options(parser)
    parser.add_argument("--lit", help="lit_pretrain.py's --out (default: <--runs>/lit, lit-smoke)")
    parser.add_argument("--out", help="default: <--runs>/real (real-smoke)")
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="heads")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--zeroshot-images", type=int, default=2000)
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--extra", default="", help="further halo-embed finetune options")
    args = parser.parse_args(argv)
    suffix = "-smoke" if args.smoke else ""
    args.lit = args.lit or str(Path(args.runs) / f"lit{suffix}")
    args.out = args.out or str(Path(args.runs) / f"real{suffix}")
    args.shared = str(datasets(args))
    args.data_root = Path(args.runs) / ("smoke-data" if args.smoke else "data")
    if args.smoke:
        args.seeds, args.variants = [0], ["halo-sphere", "clip"]
        args.zeroshot_images, args.eval_images = 40, 60  # 60: the prompt-pair decision fit needs 50 images
        args.extra = (args.extra + " --max-steps 2 --epochs 1 --save-every 2").strip()
        if not (Path(args.lit) / "pretrain.json").exists():  # lit_pretrain.py --smoke's start
            import lit_pretrain

            lit_pretrain.main(["--smoke", "--out", args.lit, "--data", args.data, "--runs", args.runs])
    return args


def lit_scale(lit_folder: Path) -> float:
    """The pretrained model's CLIP logit scale (HALO's starting 2 g under the sphere geometry)."""
    from safetensors.torch import load_file

    return float(load_file(str(lit_folder / "open_clip_model.safetensors"))["logit_scale"].exp())


def run_dir(args, variant: str, seed: int) -> Path:
    return Path(args.out) / args.setting / f"{variant}-seed{seed}"


def finetune_command(args, variant: str, seed: int) -> list[str]:
    train, val = flickr_csvs(args.shared, Path(args.out) / "flickr", 560 if args.smoke else None,
                             20 if args.smoke else 200)  # smoke: 10 % of 560 is the 56 a decision fit needs
    lit_folder = Path(args.lit) / "lit-effnet-minilm"
    cifar_test = cifar10(args.data_root / "cifar10", args.shared) / "test"
    folder = run_dir(args, variant, seed)
    variant_args = [a.format(scale=f"{lit_scale(lit_folder):.6g}") for a in VARIANTS[variant]]
    command = [str(Path(sys.executable).parent / "halo-embed"), "finetune", "--model", f"local-dir:{lit_folder}",
               "--train-data", str(train), "--val-data", str(val), "--calibration-split", "0.1",
               "--ood-data", str(Path(args.shared) / "svhn-partial.npz"), str(Path(args.shared) / "mnist-test"),
               "--zeroshot-data", str(cifar_test), "--zeroshot-images", str(args.zeroshot_images),
               "--zeroshot-templates", TEMPLATE, "--eval-images", str(args.eval_images), "--wise-ft", *ALPHAS,
               "--seed", str(seed), "--output", str(folder.parent), "--name", folder.name, "--no-progress",
               "--report-to", "none", "--feature-cache", str(Path(args.out) / "feature_cache"),
               *SETTINGS[args.setting], *variant_args, *shlex.split(args.extra)]
    if folder.exists():
        command += ["--resume", "latest"]
    return command


def run(args) -> None:
    for seed in args.seeds:
        for variant in args.variants:
            if (run_dir(args, variant, seed) / "report.md").exists():
                print(f"{run_dir(args, variant, seed)} is done")
                continue
            command = finetune_command(args, variant, seed)
            print("+ " + shlex.join(command), flush=True)
            code = subprocess.run(command).returncode
            if code not in (0, 1):  # 1: some rows skipped (reported), the run is complete
                sys.exit(f"halo-embed finetune exited with {code}")


# ---------------------------------------------------------------------------
# after the runs: the unseen Tiny-ImageNet classes, and a threshold carried over from another data set
# ---------------------------------------------------------------------------


def _model(checkpoint: Path, cache_dir: Path):
    from halo_embed.clip import load_model
    from halo_embed.clip.feature_cache import FeatureCache

    model = load_model(checkpoint).eval()
    model.backbone.lock_image()  # evaluation only: every weight is fixed, so the towers' features are cached
    model.backbone.lock_text(0, freeze_layer_norm=True)
    model.backbone.attach_feature_cache(_CACHES.setdefault(cache_dir, FeatureCache(cache_dir)))
    return model


_CACHES: dict = {}


def prompt_pairs(data, seed: int) -> tuple[list, list[str], list[str]]:
    """Each image with its class prompt (aligned) and with another class's prompt (mismatched)."""
    rng = random.Random(seed)
    aligned = [TEMPLATE.format(data.classnames[int(y)]) for y in data.labels]
    mismatched = [TEMPLATE.format(data.classnames[rng.choice([c for c in range(len(data.classnames)) if c != int(y)])])
                  for y in data.labels]
    return list(data.images), aligned, mismatched


@torch.no_grad()
def carried_threshold(model, data, seed: int) -> float:
    """The best threshold on the pair score for Tiny-ImageNet class-prompt pairs (another data set)."""
    from halo_embed.clip.evaluate import embed_images, embed_texts, view_of
    from halo_embed.eval import best_threshold

    view = view_of(model)
    images, aligned, mismatched = prompt_pairs(data, seed)
    pixels = embed_images(view, images, view.backbone.image_transform(False), "cpu", 128)
    scores = [view.pair_scores(pixels, embed_texts(view, texts, "cpu", 128)).numpy() for texts in (aligned, mismatched)]
    return best_threshold(scores[0], scores[1])[0]


@torch.no_grad()
def zeroshot_scores(model, data, ood_images) -> dict[str, float]:
    """CIFAR-10 vs SVHN AUROC of one model under two rejection scores, to tell the model from the score: the
    best prompt's cosine (what HALO's p(aligned) ranks by on the sphere) and MCM (CLIP's: the largest softmax
    of the cosines at temperature 1)."""
    import torch.nn.functional as F

    from halo_embed.clip.evaluate import embed_images, view_of
    from halo_embed.clip.zeroshot import class_prototypes
    from halo_embed.eval import ood_metrics

    view = view_of(model)
    prototypes = F.normalize(class_prototypes(view, data.classnames, [TEMPLATE]), dim=-1)
    transform = view.backbone.image_transform(False)
    known = F.normalize(embed_images(view, data.images, transform, "cpu", 128), dim=-1) @ prototypes.T
    unknown = F.normalize(embed_images(view, ood_images, transform, "cpu", 128), dim=-1) @ prototypes.T
    scores = {"best prompt's cosine": lambda c: c.max(1).values, "MCM": lambda c: c.softmax(1).max(1).values}
    return {name: ood_metrics(f(known).numpy(), f(unknown).numpy())["auroc"] for name, f in scores.items()}


@torch.no_grad()
def prompt_calibrated_zeroshot(model, train_data, test_data, ood_images, seed: int) -> dict:
    """HALO's zero-shot decision fitted on the zero-shot domain's own held-out pairs (``halo-embed
    calibrate``'s fit): CIFAR-10 *training* images with their class prompt (aligned) and another class's
    (mismatched); then CIFAR-10 test vs SVHN with that decision."""
    from halo_embed.clip.evaluate import embed_images, embed_texts, view_of
    from halo_embed.clip.zeroshot import evaluate_zeroshot

    view = view_of(model)
    images, aligned, mismatched = prompt_pairs(train_data, seed)
    embedded = embed_images(view, images, view.backbone.image_transform(False), "cpu", 128)
    model.fit_decision(embedded, embed_texts(view, aligned, "cpu", 128), embed_texts(view, mismatched, "cpu", 128),
                       source=f"{len(images)} CIFAR-10 training images with class prompts")
    result = evaluate_zeroshot(view, test_data, [TEMPLATE], ood={"svhn": ood_images})
    return {"decision": model.decision.to_dict(), "abstain_rate": result["abstain_rate"],
            **{k: v for k, v in result["ood"]["svhn"].items() if isinstance(v, float)}}


def posthoc(args) -> None:
    from halo_embed.clip import HALOCLIP
    from halo_embed.clip.evaluate import evaluate_alignment, view_of
    from halo_embed.data.collections import ImageCollection
    from halo_embed.clip.zeroshot import evaluate_zeroshot, load_zeroshot_data
    from halo_embed.io import atomic_write_json
    from halo_embed.recipes.finetune_data import calibration_data_for, eval_data_for
    from halo_embed.recipes.finetune_eval import calibrate_model
    from halo_embed.recipes.wise_ft import run_config

    lit = Path(args.lit)
    unseen = load_zeroshot_data(lit / "zeroshot-unseen" / "images", lit / "zeroshot-unseen" / "classnames.tsv")
    seen = load_zeroshot_data(lit / "zeroshot-seen" / "images", lit / "zeroshot-seen" / "classnames.tsv",
                              limit=1000, seed=0)
    cache_dir = Path(args.out) / "feature_cache"
    cifar = cifar10(args.data_root / "cifar10", args.shared)
    svhn = ImageCollection(Path(args.shared) / "svhn-partial.npz", limit=args.eval_images)
    svhn = [svhn[i] for i in range(len(svhn))]
    for seed in args.seeds:
        for variant in args.variants:
            folder = run_dir(args, variant, seed)
            target = folder / "posthoc.json"
            if target.exists() or not (folder / "report.md").exists():
                continue
            config = run_config(folder)
            eval_data, calibration_data = eval_data_for(config), calibration_data_for(config)
            result = {"unseen_tiny_zeroshot": {}}
            checkpoints = {"before": run_path(folder, INITIAL), "after": run_path(folder, FINAL),
                           **{f"alpha {a}": folder / "wise_ft" / f"alpha-{float(a):.2f}" for a in ALPHAS}}
            for name, checkpoint in checkpoints.items():
                model = _model(checkpoint, cache_dir)
                zeroshot = evaluate_zeroshot(view_of(model), unseen, [TEMPLATE])
                result["unseen_tiny_zeroshot"][name] = {"top1": zeroshot["top1"], "top5": zeroshot["top5"]}
            model = _model(run_path(folder, FINAL), cache_dir)
            threshold = carried_threshold(model, seen, seed)
            calibration = calibrate_model(model, calibration_data, "cpu")
            evaluation = evaluate_alignment(view_of(model), eval_data, "cpu", calibration=calibration,
                                            carried_threshold=threshold)
            result["carried_threshold"] = threshold
            cifar_test = load_zeroshot_data(cifar / "test", limit=args.zeroshot_images, seed=seed)
            result["zeroshot_scores"] = zeroshot_scores(model, cifar_test, svhn)
            if isinstance(model, HALOCLIP):
                cifar_train = load_zeroshot_data(cifar / "train", limit=args.eval_images, seed=seed)
                result["prompt_calibrated_zeroshot"] = prompt_calibrated_zeroshot(
                    _model(run_path(folder, FINAL), cache_dir), cifar_train, cifar_test, svhn, seed)
            result["rejection"] = {name: {k: v for k, v in values.items() if isinstance(v, float)}
                                   for name, values in evaluation["rejection"].items()}
            atomic_write_json(target, result)
            print(f"{folder.name}: unseen-class zero-shot {100 * result['unseen_tiny_zeroshot']['after']['top1']:.2f} %"
                  f", carried threshold {threshold:.4f}", flush=True)
    for cache in _CACHES.values():
        cache.flush()


# ---------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    array = scale * np.asarray(values, dtype=float)
    spread = array.std(ddof=1) if len(array) > 1 else 0.0
    return f"{array.mean():.{digits}f} ± {spread:.{digits}f}"


def collect(args) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            folder = run_dir(args, variant, seed)
            if not (folder / "metrics.json").exists():
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            extra = folder / "posthoc.json"
            metrics["posthoc"] = json.loads(extra.read_text()) if extra.exists() else {}
            saved = json.loads((run_path(folder, FINAL) / "config.json").read_text())
            metrics["end_temperature"] = saved["temperature"] if "temperature" in saved \
                else 0.5 * float(np.exp(saved["logit_scale"]))
            runs.setdefault(variant, []).append(metrics)
    return runs


def report(args) -> None:
    from halo_embed.eval import markdown_table
    from halo_embed.io import atomic_write_json, atomic_write_text

    runs = collect(args)
    if not runs:
        print("no finished runs")
        return
    svhn = "svhn-partial"

    def pooled(m, key, negatives="all mismatched"):
        source = m["posthoc"].get("rejection", m["eval"]["val"]["rejection"]) if key.startswith("carried") \
            else m["eval"]["val"]["rejection"]
        return source[negatives].get(key)

    rows_spec = [
        ("i2t R@1 %", lambda m: m["eval"]["val"]["retrieval"]["image_to_text_R@1"]),
        ("t2i R@1 %", lambda m: m["eval"]["val"]["retrieval"]["text_to_image_R@1"]),
        ("rejection AUROC %, another image's caption", lambda m: pooled(m, "auroc", "shuffled")),
        ("rejection AUROC %, all mismatched (caption, SVHN, MNIST)", lambda m: pooled(m, "auroc")),
        ("built-in decision % (HALO: fitted on held-out pairs)", lambda m: pooled(m, "builtin_threshold_accuracy")),
        ("HALO's constant decision % (what the fit replaced)", lambda m: pooled(m, "constant_decision_accuracy")),
        ("threshold tuned on half the test pairs %", lambda m: pooled(m, "tuned_threshold_accuracy")),
        ("threshold tuned on the calibration pairs %", lambda m: pooled(m, "calibration_threshold_accuracy")),
        ("Platt-scaled score, fitted on the calibration pairs %", lambda m: pooled(m, "platt_accuracy")),
        ("threshold carried over from Tiny-ImageNet prompts %", lambda m: pooled(m, "carried_threshold_accuracy")),
        ("ECE of p(aligned), built-in (x100)", lambda m: pooled(m, "builtin_ece")),
        ("ECE of p(aligned), Platt-scaled score (x100)", lambda m: pooled(m, "platt_ece")),
        ("Brier of p(aligned), built-in (x100)", lambda m: pooled(m, "builtin_brier")),
        ("Brier of p(aligned), Platt-scaled score (x100)", lambda m: pooled(m, "platt_brier")),
        ("CIFAR-10 zero-shot top-1 % before", lambda m: m["zeroshot"]["before"]["top1"]),
        ("CIFAR-10 zero-shot top-1 % after", lambda m: m["zeroshot"]["after"]["top1"]),
        ("CIFAR-10 vs SVHN: AUROC % (HALO p(aligned) of the best prompt, CLIP MCM)",
         lambda m: m["zeroshot"]["after"]["ood"][svhn]["auroc"]),
        ("CIFAR-10 vs SVHN: built-in decision %",
         lambda m: m["zeroshot"]["after"]["ood"][svhn].get("builtin_decision_accuracy")),
        ("CIFAR-10 vs SVHN: threshold tuned on half the test images %",
         lambda m: m["zeroshot"]["after"]["ood"][svhn]["tuned_threshold_accuracy"]),
        ("CIFAR-10 images HALO abstains on %", lambda m: m["zeroshot"]["after"].get("abstain_rate")),
        ("CIFAR-10 vs SVHN: HALO's decision fitted on CIFAR-10 training prompts %",
         lambda m: m["posthoc"].get("prompt_calibrated_zeroshot", {}).get("builtin_decision_accuracy")),
        ("CIFAR-10 vs SVHN: AUROC % scored by the best prompt's cosine",
         lambda m: m["posthoc"].get("zeroshot_scores", {}).get("best prompt's cosine")),
        ("CIFAR-10 vs SVHN: AUROC % scored by MCM",
         lambda m: m["posthoc"].get("zeroshot_scores", {}).get("MCM")),
        ("unseen Tiny-ImageNet classes: zero-shot top-1 % before",
         lambda m: m["posthoc"].get("unseen_tiny_zeroshot", {}).get("before", {}).get("top1")),
        ("unseen Tiny-ImageNet classes: zero-shot top-1 % after",
         lambda m: m["posthoc"].get("unseen_tiny_zeroshot", {}).get("after", {}).get("top1")),
    ]
    variants = list(runs)
    rows = [[label, *(_mean_std([read(m) for m in runs[v]]) for v in variants)] for label, read in rows_spec]
    rows.append(["temperature at the end (HALO g; CLIP: scale / 2)",
                 *(_mean_std([m["end_temperature"] for m in runs[v]], scale=1.0, digits=2) for v in variants)])
    seeds = {v: len(runs[v]) for v in variants}
    wise = [["alpha", *(f"{v}: Flickr mean recall / CIFAR-10 zero-shot / unseen Tiny zero-shot %" for v in variants)]]
    for i, alpha in enumerate(ALPHAS):
        row = [alpha]
        for v in variants:
            recall = _mean_std([m["wise_ft"]["alphas"][i]["mean_recall"] for m in runs[v]])
            cifar = _mean_std([m["wise_ft"]["alphas"][i]["zeroshot"]["top1"] for m in runs[v]])
            tiny = _mean_std([m["posthoc"].get("unseen_tiny_zeroshot", {}).get(f"alpha {alpha}", {}).get("top1")
                              for m in runs[v]])
            row.append(f"{recall} / {cifar} / {tiny}")
        wise.append(row)
    text = (f"# Real pretrained start, setting `{args.setting}` (seeds per variant: {seeds})\n\n"
            + markdown_table(["metric (mean ± std over seeds)", *variants], rows)
            + "\n\n## WiSE-FT\n\n" + markdown_table(wise[0], wise[1:]) + "\n")
    out = Path(args.out) / f"report-{args.setting}.md"
    atomic_write_text(out, text)
    atomic_write_json(Path(args.out) / f"summary-{args.setting}.json",
                      {v: [{k: m[k] for k in ("eval", "zeroshot", "wise_ft", "posthoc", "decision") if k in m}
                           for m in runs[v]] for v in variants})
    print(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    for stage in args.stages:
        {"run": run, "posthoc": posthoc, "report": report}[stage](args)


if __name__ == "__main__":
    main()
