"""The fine-tuning recipe end to end on tiny models and generated data (CPU, seconds)."""

import json

import pytest
import torch

from conftest import shape_images
from halo_embed.recipes.clip_finetune import FinetuneConfig, train


def tiny_config(tmp_path, model_dir, **overrides):
    values = dict(
        model=f"local-dir:{model_dir}", train_data="shapes", shapes_train_images=48, shapes_val_images=24,
        batch_size=16, epochs=1, max_steps=4, save_every=2, log_every=1, eval_images=24, warmup=2,
        calibration_samples=32, logs=str(tmp_path), name="run", progress=False, lr=1e-3,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_halo_finetune_end_to_end(tmp_path, tiny_model_dirs):
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"])
    metrics = train(config)
    run = tmp_path / "run"
    assert metrics["steps"] == 4
    for name in ("report.md", "metrics.json", "log.jsonl", "checkpoint/model.safetensors", "val_pair_scores.png"):
        assert (run / name).exists(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("gamma" in r and "lr" in r for r in log)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    val = metrics["eval"]["val"]
    assert set(val["rejection"]) == {"shuffled", "hard negatives", "OOD: textures", "all mismatched"}
    assert 0 <= val["retrieval"]["image_to_text_R@1"] <= 1
    assert "builtin_threshold_accuracy" in val["rejection"]["all mismatched"]
    report = (run / "report.md").read_text()
    assert "built-in threshold acc. %" in report and "unseen combinations" in report

    from halo_embed.clip import AlignmentScorer

    scorer = AlignmentScorer.from_checkpoint(str(run / "checkpoint"))
    scores = scorer.score(shape_images(2), ["a small red circle in the top left", "a large blue square in the center"])
    assert scores.probability.shape == (2,)


def test_resume_replays_the_same_run(tmp_path, tiny_model_dirs):
    """4 steps straight == 2 steps, stop, resume from the step-2 checkpoint, 2 more steps."""
    straight = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], name="straight", accum_freq=2,
                           batch_size=8)
    train(straight)
    resumed = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], name="resumed", accum_freq=2, batch_size=8,
                          resume=str(tmp_path / "straight" / "checkpoints" / "step-0000002"))
    train(resumed)
    a = weights(tmp_path / "straight" / "checkpoint")
    b = weights(tmp_path / "resumed" / "checkpoint")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [3, 4]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_baselines_train_and_evaluate(tmp_path, tiny_model_dirs, loss):
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], loss=loss, max_steps=2)
    metrics = train(config)
    pooled = metrics["eval"]["val"]["rejection"]["all mismatched"]
    assert ("builtin_threshold_accuracy" in pooled) == (loss == "siglip")  # CLIP has no built-in decision
    assert not (tmp_path / "run" / "checkpoint").exists()


def write_csv_data(tmp_path, broken=True):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["filepath,title"]
    for i, image in enumerate(shape_images(20, seed=3)):
        image.save(folder / f"{i}.png")
        rows += [f"images/{i}.png,shape number {i}", f"images/{i}.png,another caption of image {i}"]
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
        rows += ["images/broken.png,a broken image", "images/missing.png,a missing image"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:21]) + "\n")
    return tmp_path / "train.csv", tmp_path / "val.csv"


def test_csv_data_with_broken_images(tmp_path, tiny_model_dirs):
    train_csv, val_csv = write_csv_data(tmp_path)
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], train_data=str(train_csv),
                         val_data=str(val_csv), max_steps=None, epochs=1, batch_size=14, calibration_samples=16)
    metrics = train(config)
    assert metrics["steps"] == 3 and metrics["skipped_images"] == 2
    strict = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], train_data=str(train_csv),
                         val_data=str(val_csv), max_steps=None, epochs=1, batch_size=14, calibration_samples=16,
                         strict_images=True, name="strict")
    with pytest.raises(ValueError, match=r"broken training image \(--strict-images\): (cannot read image|image file not found)"):
        train(strict)


def test_hf_dataset_from_disk_with_caption_lists(tmp_path, tiny_model_dirs):
    import datasets

    images = shape_images(12, seed=4)
    data = datasets.Dataset.from_dict(
        {"image": images, "captions": [[f"shape {i}", f"picture {i}"] for i in range(12)]},
        features=datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))}),
    )
    data.save_to_disk(str(tmp_path / "hf"))
    from halo_embed.data.pairs import HFPairs

    pairs = HFPairs(str(tmp_path / "hf"), image_column="image", text_column="captions")
    assert len(pairs) == 24 and pairs[3][1:] == ("picture 1", 1) and pairs.text_and_group(5) == ("picture 2", 2)
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], train_data=str(tmp_path / "hf"),
                         val_data=str(tmp_path / "hf"), dataset_type="hf", hf_text_column="captions",
                         hf_val_split="train", max_steps=2, batch_size=8, calibration_samples=16)
    assert train(config)["steps"] == 2
    with pytest.raises(ValueError, match=r"has no column 'text'"):
        HFPairs(str(tmp_path / "hf"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from halo_embed.cli import main

    assert main(["finetune", "--train-data", str(tmp_path / "nope.csv"), "--val-data", "x.csv",
                 "--logs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("halo-embed finetune: error: caption file not found") and "\n" not in err
    assert main(["finetune", "--batch-size", "0", "--logs", str(tmp_path)]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dirs):
    """torchrun --nproc_per_node 2 (gloo, batch 8 each) == 1 process with batch 16: same weights after 2 steps."""
    import os
    import subprocess
    import sys

    common = ["--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", "--shapes-train-images", "48",
              "--shapes-val-images", "16", "--eval-images", "16", "--max-steps", "2", "--save-every", "2",
              "--calibration-samples", "32", "--output", str(tmp_path), "--no-progress", "--lr", "1e-3", "--warmup", "1"]
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, "-m", "halo_embed.recipes.clip_finetune", *common, "--batch-size", "8",
                          "--name", "two"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "halo_embed.recipes.clip_finetune", *common, "--batch-size", "16",
                          "--name", "one"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "one" / "checkpoint"), weights(tmp_path / "two" / "checkpoint")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
