"""Which learning rate, warm-up, unlocked layers and epochs suit a pretrained CLIP fine-tuned on a few
thousand pairs? A grid on Flickr8k-1000 (4,000 training pairs) from the pretrained model of
``experiments/pretrained_workflow.py`` (the MiniLM text tower locked, as there).

Each setting is one ``halo-embed finetune`` run (seed 0, batch 64, HALO by default, ``--losses`` to change)
evaluated on the 200 validation images (mean recall of R@1/5/10 both ways) and on 1,000 held-out
Tiny-ImageNet images (zero-shot top-1 before and after: what the setting keeps). Prints one table and
writes ``<out>/small_data_grid.md`` / ``.json``; a setting whose run folder has a report is not rerun.

    .venv/bin/python experiments/pretrained_workflow.py pretrain      # once: the pretrained model
    .venv/bin/python experiments/small_data_preset.py                 # about 7 minutes per setting (2 CPU cores)
    .venv/bin/python experiments/small_data_preset.py --smoke         # one setting, two steps, generated data
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

from _shared import add_common_options, datasets, flickr_csvs
from pretrained_workflow import SMOKE_WORKFLOW, finetune_command

#: name -> finetune options; every setting trains 3 epochs unless it says otherwise
GRID = {
    "lr3e-5": "--lr 3e-5 --warmup 20",
    "lr1e-4": "--lr 1e-4 --warmup 20",
    "lr3e-4": "--lr 3e-4 --warmup 20",
    "lr1e-4-image-last2": "--lr 1e-4 --warmup 20 --lock-image --lock-image-unlocked-groups 2",
    "lr3e-4-image-last2": "--lr 3e-4 --warmup 20 --lock-image --lock-image-unlocked-groups 2",
    "lr1e-4-6ep": "--lr 1e-4 --warmup 20 --epochs 6",
}
#: the settings behind --preset small-data (README's table); lr1e-4-6ep with --settings
DEFAULT_SETTINGS = ["lr3e-5", "lr1e-4", "lr3e-4", "lr1e-4-image-last2", "lr3e-4-image-last2"]


def main(argv=None) -> None:
    from halo_embed.eval import markdown_table
    from halo_embed.io import atomic_write_json, atomic_write_text
    from halo_embed.recipes.wise_ft import mean_recall

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--workflow", help="pretrained_workflow.py's --out (default: <--runs>/workflow)")
    parser.add_argument("--lit", help="lit_pretrain.py's --out (default: <--runs>/lit)")
    parser.add_argument("--out", help="default: <--runs>/small_data")
    parser.add_argument("--losses", nargs="+", default=["halo"])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(GRID))
    args = parser.parse_args(argv)
    suffix = "-smoke" if args.smoke else ""
    workflow = Path(args.workflow or Path(args.runs) / f"workflow{suffix}")
    lit = Path(args.lit or Path(args.runs) / f"lit{suffix}")
    out = Path(args.out or Path(args.runs) / f"small_data{suffix}")
    extra = []
    if args.smoke:  # the pretrained start and the Flickr CSVs of pretrained_workflow.py --smoke, then 2 steps
        import lit_pretrain

        if not (lit / "pretrain.json").exists():
            lit_pretrain.main(["--smoke", "--out", str(lit), "--data", args.data, "--runs", args.runs])
        flickr_csvs(datasets(args), workflow / "flickr", val_images=8)
        args.settings, extra = ["lr1e-4-image-last2"], SMOKE_WORKFLOW
    rows, results = [], {}
    for setting in args.settings:
        for loss in args.losses:
            name = f"{setting}-{loss}"
            run = out / name
            if not (run / "report.md").exists():
                command = [*finetune_command(workflow, 1000, lit), "--loss", loss, "--batch-size", "64", "--epochs", "3",
                           "--seed", "0", "--output", str(out), "--name", name, *shlex.split(GRID[setting]), *extra]
                print("+ " + shlex.join(command), flush=True)
                subprocess.run(command, check=True)
            metrics = json.loads((run / "metrics.json").read_text())
            val, zs = metrics["eval"]["val"], metrics["zeroshot"]
            results[name] = {"options": GRID[setting], "loss": loss, "steps": metrics["steps"],
                             "mean_recall": mean_recall(val["retrieval"]),
                             "auroc": val["rejection"]["all mismatched"]["auroc"],
                             "zeroshot_before": zs["before"]["top1"], "zeroshot_after": zs["after"]["top1"]}
            r = results[name]
            rows.append([setting, loss, GRID[setting], r["steps"], f"{100 * r['mean_recall']:.2f}",
                         f"{100 * r['auroc']:.2f}", f"{100 * r['zeroshot_before']:.2f}",
                         f"{100 * r['zeroshot_after']:.2f}"])
    table = markdown_table(["setting", "loss", "options (3 epochs, batch 64)", "steps", "Flickr mean recall %",
                            "AUROC mismatched %", "zero-shot before %", "zero-shot after %"], rows)
    atomic_write_json(out / "small_data_grid.json", results)
    atomic_write_text(out / "small_data_grid.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
