"""The fine-tuning recipe end to end on tiny models and generated data (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch

from conftest import shape_images
from halo_embed.recipes.clip_finetune import FinetuneConfig, train


def tiny_config(tmp_path, model_dir, **overrides):
    values = dict(
        model=f"local-dir:{model_dir}", train_data="shapes", shapes_train_images=48, shapes_val_images=24,
        batch_size=16, epochs=1, max_steps=4, save_every=2, log_every=1, eval_images=24, warmup=2,
        adapter_samples=32, logs=str(tmp_path), name="run", progress=False, lr=1e-3,
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
    for name in ("report.md", "metrics.json", "log.jsonl", "final/model.safetensors", "val_pair_scores.png"):
        assert (run / name).exists(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("temperature" in r and "lr" in r for r in log)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    val = metrics["eval"]["val"]
    assert set(val["rejection"]) == {"shuffled", "hard negatives", "OOD: textures", "all mismatched"}
    retrieval = val["retrieval"]
    for direction in ("image_to_text", "text_to_image"):  # recall can only grow with k
        assert retrieval[f"{direction}_R@1"] <= retrieval[f"{direction}_R@5"] <= retrieval[f"{direction}_R@10"]
    assert "builtin_threshold_accuracy" in val["rejection"]["all mismatched"]
    report = (run / "report.md").read_text()
    assert "built-in decision acc. %" in report and "unseen combinations" in report

    from halo_embed.clip import AlignmentScorer

    scorer = AlignmentScorer.from_checkpoint(str(run / "final"))
    scores = scorer.score(shape_images(2), ["a small red circle in the top left", "a large blue square in the center"])
    assert scores.probability.shape == (2,)


def test_running_normalization_checkpoint_scores_what_the_evaluation_measured(tmp_path, tiny_model_dirs):
    """Pairs scored through AlignmentScorer from the saved checkpoint get the logits the end-of-run evaluation
    computed for them (so the running statistics it used are the ones saved)."""
    from halo_embed.clip import AlignmentScorer
    from halo_embed.recipes.finetune_data import eval_data_for

    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], normalization="running",
                         normalization_momentum=0.5)
    metrics = train(config)
    checkpoint = tmp_path / "run" / "final"
    assert json.loads((checkpoint / "config.json").read_text())["adapter"]["normalization"] == "running"
    data = eval_data_for(config)
    refs, text_ids = data.pair_sets["aligned"]
    images = [data.images[i] for _, i in refs[:6]]
    texts = [data.texts[t] for t in text_ids[:6]]
    scores = AlignmentScorer.from_checkpoint(str(checkpoint)).score(images, texts)
    np.testing.assert_allclose(scores.logit.numpy(), metrics["eval"]["val"]["scores"]["aligned"][:6], rtol=1e-5,
                               atol=1e-4)


def test_a_run_never_overwrites_another(tmp_path, tiny_model_dirs, capsys):
    """The same --name again without --resume is refused before anything is written; --resume latest continues."""
    from halo_embed.cli import main

    model = f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"
    common = ["finetune", "--model", model, "--shapes-train-images", "48", "--shapes-val-images", "24",
              "--batch-size", "16", "--eval-images", "24", "--adapter-samples", "32", "--warmup", "2",
              "--logs", str(tmp_path), "--name", "r", "--no-progress"]
    assert main(common + ["--max-steps", "4", "--save-every", "2"]) == 0
    run = tmp_path / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(common + ["--max-steps", "2", "--save-every", "1"]) == 2
    assert f"run folder {run} already holds a run: continue it with --resume latest" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    # a comparison is refused before its first loss trains
    (tmp_path / "cmp" / "clip" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cmp" / "clip" / "checkpoints" / "latest").write_text("step-0000002\n")
    compare = [a if a != "r" else "cmp" for a in common] + ["--loss", "halo", "clip", "--max-steps", "2"]
    assert main(compare) == 2 and not (tmp_path / "cmp" / "halo").exists()
    # a run that stopped before its first save left only its config and log: it may start again
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "config.json").write_text("{}")
    (tmp_path / "stopped" / "log.jsonl").write_text("{}\n")
    stopped = [a if a != "r" else "stopped" for a in common]
    assert main(stopped + ["--max-steps", "2"]) == 0
    # resuming the finished run is allowed (nothing left to train) and keeps its checkpoints
    assert main(common + ["--max-steps", "4", "--save-every", "2", "--resume", "latest"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]


def test_resume_replays_the_same_run(tmp_path, tiny_model_dirs):
    """4 steps straight == 2 steps, stop, resume from the step-2 checkpoint, 2 more steps."""
    straight = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], name="straight", accum_freq=2,
                           batch_size=8)
    train(straight)
    resumed = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], name="resumed", accum_freq=2, batch_size=8,
                          resume=str(tmp_path / "straight" / "checkpoints" / "step-0000002"))
    train(resumed)
    a = weights(tmp_path / "straight" / "final")
    b = weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "resumed" not in r] == [3, 4]
    assert records[0]["resumed"].endswith("step-0000002") and records[0]["changed"] == [
        "--name 'resumed' (the run: 'straight')"]


def test_accumulation_steps_once_per_group(tmp_path, tiny_model_dirs):
    """--accum-freq 2: each optimizer and scheduler step consumes two micro-batches."""
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], accum_freq=2, batch_size=8, max_steps=3,
                         warmup=4, save_every=3, shapes_train_images=96)
    train(config)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # warm-up of 4 steps: step s uses the learning rate lr * s / 4 (a scheduler step per micro-batch would give
    # lr * (2 s - 1) / 4)
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * 1 / 4, 1e-3 * 2 / 4, 1e-3 * 3 / 4])
    position = json.loads((tmp_path / "run" / "checkpoints" / "step-0000003" / "progress.json").read_text())
    assert (position["step"], position["epoch"], position["batches_in_epoch"]) == (3, 0, 6)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_baselines_train_and_evaluate(tmp_path, tiny_model_dirs, loss):
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], loss=loss, max_steps=2)
    metrics = train(config)
    pooled = metrics["eval"]["val"]["rejection"]["all mismatched"]
    assert ("builtin_threshold_accuracy" in pooled) == (loss == "siglip")  # CLIP has no built-in decision
    from halo_embed.clip import ContrastiveCLIP, load_model

    saved = load_model(tmp_path / "run" / "final")  # the baseline is kept too (for WiSE-FT, for comparisons)
    assert isinstance(saved, ContrastiveCLIP) and saved.loss_name == loss


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
                         val_data=str(val_csv), max_steps=None, epochs=1, batch_size=14, adapter_samples=16)
    metrics = train(config)
    assert metrics["steps"] == 3 and metrics["skipped_images"] == 2
    # the command line says so with exit status 1 (done, some input rejected)
    from halo_embed.cli import main

    assert main(["finetune", "--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", "--train-data",
                 str(train_csv), "--val-data", str(val_csv), "--epochs", "1", "--batch-size", "14",
                 "--adapter-samples", "16", "--eval-images", "24", "--logs", str(tmp_path), "--name", "cli",
                 "--no-progress"]) == 1
    strict = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], train_data=str(train_csv),
                         val_data=str(val_csv), max_steps=None, epochs=1, batch_size=14, adapter_samples=16,
                         strict_images=True, name="strict")
    with pytest.raises(ValueError, match=r"broken training image \(--strict-images\): (cannot read image|image file not found)"):
        train(strict)


def test_csv_pairs_read_with_the_csv_module_and_skip_undecodable_rows(tmp_path):
    from halo_embed.data.pairs import CSVPairs

    (tmp_path / "t.csv").write_bytes(b'filepath,title\na.png,"two\nlines, one caption"\nb.png,bad \xfe byte\n'
                                     b'a.png,second caption of a\n')
    with pytest.warns(UserWarning, match=r"1 row\(s\) of .*t.csv skipped, e.g. .*t.csv, line 4: not valid UTF-8"):
        pairs = CSVPairs(tmp_path / "t.csv")
    assert [p[1:] for p in pairs.pairs] == [("two\nlines, one caption", 0), ("second caption of a", 0)]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty: it needs a header row"):
        CSVPairs(tmp_path / "empty.csv")
    # the column names `halo-embed score` reads by default work here too (and a named column wins)
    (tmp_path / "plain.csv").write_text("caption,image,title\nthe caption,a.png,a title\n")
    assert CSVPairs(tmp_path / "plain.csv").pairs[0][1] == "a title"  # open_clip's name first
    assert CSVPairs(tmp_path / "plain.csv", caption_key="caption").pairs[0][1] == "the caption"
    (tmp_path / "neither.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="has no column 'filepath' or 'image' .*set --csv-img-key"):
        CSVPairs(tmp_path / "neither.csv")


@pytest.mark.parametrize("loss, normalization", [("clip", "auto"), ("halo", "auto"), ("halo", "fixed")])
def test_every_image_missing_is_an_error_not_a_hang(tmp_path, tiny_model_dirs, loss, normalization):
    rows = ["filepath,title"] + [f"gone/{i}.png,caption {i}" for i in range(40)]
    (tmp_path / "missing.csv").write_text("\n".join(rows) + "\n")
    config = tiny_config(tmp_path, tiny_model_dirs["open_clip_local_dir"], train_data=str(tmp_path / "missing.csv"),
                         val_data=str(tmp_path / "missing.csv"), loss=loss, max_steps=None, epochs=3, batch_size=8,
                         normalization=normalization)
    # the fixed adapter reads samples for its statistics first; otherwise the first epoch finds every image gone
    message = ("none of the 32 samples for the adapter's statistics could be read" if normalization == "fixed"
               else "no training image of a whole epoch could be read")
    with pytest.raises(ValueError, match=rf"{message}, e.g. .*gone/\d+.png"):
        train(config)


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
                         hf_val_split="train", max_steps=2, batch_size=8, adapter_samples=16)
    assert train(config)["steps"] == 2
    with pytest.raises(ValueError, match=r"has no column 'text'"):
        HFPairs(str(tmp_path / "hf"))


def test_exit_codes_internal_error_is_3_with_a_traceback_log(capsys, monkeypatch):
    import os
    import re

    from halo_embed.cli import build_parser
    from halo_embed.exit_status import run_handler

    def crash(args):
        raise RuntimeError("an internal bug")

    monkeypatch.delenv("HALO_EMBED_DEBUG", raising=False)
    assert run_handler("score", crash, None) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("halo-embed score: internal error: RuntimeError: an internal bug")
    log = re.search(r"traceback in (\S+)\)$", err).group(1)
    text = open(log).read()
    os.unlink(log)
    assert "Traceback" in text and "an internal bug" in text
    assert run_handler("score", lambda args: 1, None) == 1  # rows rejected: the command's own status
    assert "3 internal error" in build_parser().format_help()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from halo_embed.cli import main

    assert main(["finetune", "--train-data", str(tmp_path / "nope.csv"), "--val-data", "x.csv",
                 "--logs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("halo-embed finetune: error: caption file not found") and "\n" not in err
    assert main(["finetune", "--batch-size", "0", "--logs", str(tmp_path)]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    # caught before anything is trained or written
    (tmp_path / "data").mkdir()
    train_csv, _ = write_csv_data(tmp_path / "data", broken=False)
    for args, message in (
        (["--model", "ViT-Z-99"], "unknown open_clip model 'ViT-Z-99'"),
        (["--model", str(tmp_path / "nope.json")], "model config file not found"),
        (["--train-data", str(train_csv), "--batch-size", "8"], "--val-data is required for this --train-data"),
    ):
        assert main(["finetune", *args, "--logs", str(tmp_path / "runs"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not (tmp_path / "runs").exists()
    for steps in ("-1", "0"):
        assert main(["finetune", "--max-steps", steps, "--logs", str(tmp_path)]) == 2
        assert f"--max-steps must be >= 1 (leave it out to train --epochs epochs), got {steps}" in capsys.readouterr().err
    assert main(["finetune", "--normalization", "running", "--normalization-momentum", "0",
                 "--logs", str(tmp_path)]) == 2
    assert "--normalization-momentum must be in (0, 1], got 0.0" in capsys.readouterr().err


def test_two_processes_match_one(tmp_path, tiny_model_dirs):
    """torchrun --nproc_per_node 2 (gloo, batch 8 each) == 1 process with batch 16: same weights after 2 steps."""
    import os
    import subprocess
    import sys

    common = ["--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", "--shapes-train-images", "48",
              "--shapes-val-images", "16", "--eval-images", "16", "--max-steps", "2", "--save-every", "2",
              "--adapter-samples", "32", "--output", str(tmp_path), "--no-progress", "--lr", "1e-3", "--warmup", "1"]
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
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_a_finetune_run_is_a_contract(tmp_path, tiny_model_dirs, capsys):
    """One process per run folder; a resume continues the run that was started; the run position needs no
    pickle (a crafted one in a checkpoint is never executed); a damaged newest checkpoint falls back to the
    older complete one; a torn last log line is dropped; nothing is written before an input error."""
    import os
    import pickle

    from halo_embed.cli import main
    from halo_embed.io import claim_for

    model = f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"
    base = ["finetune", "--model", model, "--shapes-train-images", "48", "--shapes-val-images", "24",
            "--eval-images", "24", "--batch-size", "16", "--warmup", "2", "--adapter-samples", "32",
            "--logs", str(tmp_path), "--name", "run", "--no-progress", "--report-to", "none", "--save-every", "2",
            "--keep-checkpoints", "3", "--log-every", "1"]
    with claim_for(tmp_path / "run", "the test"):
        assert main([*base, "--max-steps", "2"]) == 2
    assert "is in use by pid" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main([*base, "--max-steps", "4"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for changed, message in ((["--lr", "0.3"], "--lr 0.3 (the run: 0.0005)"),
                             (["--loss", "clip"], "--loss 'clip' (the run: 'halo')"),
                             (["--zeroshot-data", str(tmp_path / "nowhere")], "does not exist")):
        assert main([*base, "--max-steps", "6", "--resume", "latest", *changed]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot  # the run is unchanged

    class Payload:
        def __reduce__(self):
            return (exec, ("open(__import__('os').environ['HALO_TEST_MARK'], 'w').write('ran')",))

    newest, older = run / "checkpoints" / "step-0000004", run / "checkpoints" / "step-0000002"
    for folder in (newest, older):  # where Accelerate would unpickle a registered object in full
        (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"step": Payload()}))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a torn newest checkpoint
    with open(run / "log.jsonl", "a") as handle:  # and a torn last log line
        handle.write('{"step": 5, "lo')
    os.environ["HALO_TEST_MARK"] = str(tmp_path / "mark")
    try:
        assert main([*base, "--max-steps", "6", "--resume", "latest"]) == 0
    finally:
        del os.environ["HALO_TEST_MARK"]
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged" in err and f"using the previous one, {older}" in err
    assert not (tmp_path / "mark").exists()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "resumed" in r]
    assert resumed == [{"step": 2, "resumed": str(older), "changed": ["--max-steps 6 (the run: 4)"]}]
    assert [r["step"] for r in records if "resumed" not in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4  # the run's config, not rewritten


def test_a_full_disk_names_the_checkpoint(tmp_path, tiny_model_dirs, monkeypatch):
    """No space left while a checkpoint is written: an OSError naming the checkpoint (exit 2 on the command
    line), and no half-written folder."""
    import errno

    import safetensors.torch

    from halo_embed.clip import HALOCLIP, load_backbone, save_checkpoint

    model = HALOCLIP(load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"), 8,
                     normalization="sphere")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(OSError, match=rf"cannot write the checkpoint {tmp_path / 'ckpt'}: .*No space left"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
