"""The CIFAR recipe end to end on generated CIFAR-like data (an ImageFolder copy), CPU, seconds."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from halo_embed.data.arrays import AugmentedBatches, ImageArray, load_image_folder, load_ood
from halo_embed.recipes import cifar

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """10 classes of coloured bars on noise (train/test ImageFolder), plus OOD as .npz and as a folder."""
    root = tmp_path_factory.mktemp("tinycifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, name in enumerate(NAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                a = np.clip(rng.normal(100, 20, (32, 32, 3)), 0, 255)
                a[6 + 2 * c : 14 + 2 * c, 4:28] = (25 * c, 255 - 25 * c, 128)
                Image.fromarray(a.astype(np.uint8)).save(folder / f"{i}.png")
    np.savez(root / "noise.npz", x=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    (root / "grey").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "grey" / f"{i}.png")
    return root


def test_augmentation_is_a_flipped_crop_and_deterministic():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    data = ImageArray(images, torch.arange(16), "x")
    batches = AugmentedBatches(data, 8, (0.0,) * 3, (1 / 255,) * 3, train=True, seed=3)
    first = list(batches.epoch(1))
    again = list(batches.epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    padded = F.pad(images.float(), (4, 4, 4, 4))
    for x, y in first:
        assert x.is_contiguous()
        for image, label in zip(x, y):
            windows = [padded[label, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
            assert any(torch.equal(w, image) or torch.equal(w.flip(-1), image) for w in windows)
    evaluation = AugmentedBatches(data, 5, (0.0,) * 3, (1 / 255,) * 3)
    assert len(evaluation) == 4 and torch.equal(torch.cat([x for x, _ in evaluation.epoch()]), images.float())


def test_loaders(tiny_cifar):
    train = load_image_folder(tiny_cifar / "train")
    assert train.images.shape == (240, 3, 32, 32) and train.classes == sorted(NAMES)
    grey = load_ood(str(tiny_cifar / "grey"), tiny_cifar, download=False, limit=5)
    assert grey.images.shape == (5, 3, 32, 32) and grey.labels is None
    with pytest.raises(FileNotFoundError, match="svhn not found under .* pass --download"):
        load_ood("svhn", tiny_cifar / "nowhere", download=False, limit=None)


def parse(argv):
    parser = argparse.ArgumentParser()
    cifar.add_arguments(parser)
    return parser.parse_args(argv)


def common(tiny_cifar, tmp_path):
    return ["--data-dir", str(tiny_cifar), "--near-ood", str(tiny_cifar / "noise.npz"), "--far-ood",
            str(tiny_cifar / "grey"), "--width", "4", "--batch-size", "32", "--output", str(tmp_path), "--no-progress"]


def test_compare_end_to_end(tiny_cifar, tmp_path):
    argv = ["compare", *common(tiny_cifar, tmp_path), "--epochs", "2", "--name", "cmp"]
    assert cifar.run(parse(argv)) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| metric | CCE | HALO | CCE (published) | HALO (published) |" in report
    assert "| ID accuracy % |" in report and "96.53" in report
    for loss in ("cce", "halo"):
        metrics = json.loads((tmp_path / "cmp" / loss / "metrics.json").read_text())["metrics"]
        assert set(metrics["near"]) == {"noise"} and set(metrics["far"]) == {"grey"}  # learning: the next test
        for png in ("reliability.png", "scores.png", "pca.png"):
            assert (tmp_path / "cmp" / loss / png).stat().st_size > 5000
    halo = json.loads((tmp_path / "cmp" / "halo" / "metrics.json").read_text())["metrics"]
    assert set(halo["ood"]) == {"not_abstain", "msp", "neg_distance", "energy"}
    # the same run again without --resume is refused before anything is trained or written
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("*")}
    for again in (argv, argv + ["--seeds", "1"], ["--loss", "halo", *argv[1:]]):
        with pytest.raises(FileExistsError, match=r"run folder .*cmp/(cce|halo) already holds a run"):
            cifar.run(parse(again))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("*")} == before


def test_both_losses_learn_separable_images(tiny_cifar, tmp_path):
    """Each class's bar sits at its own height: at width 8 and 8 epochs both losses must be far above chance
    (10 %; measured 100 % and 91 %), and HALO's calibrated decision must keep most of the test images."""
    argv = ["compare", *common(tiny_cifar, tmp_path), "--width", "8", "--batch-size", "16", "--epochs", "8",
            "--name", "learn"]
    assert cifar.run(parse(argv)) == 0
    for loss in ("cce", "halo"):
        metrics = json.loads((tmp_path / "learn" / loss / "metrics.json").read_text())["metrics"]
        assert metrics["accuracy"] >= 0.7, (loss, metrics["accuracy"])
    decision = json.loads((tmp_path / "learn" / "halo" / "metrics.json").read_text())["metrics"]["decision"]
    assert decision["rules"]["sink"]["id_kept"] >= 0.7


def test_a_run_of_the_older_layout_resumes_where_it_is(tiny_cifar, tmp_path):
    """Runs written before 2026-12-07 kept their checkpoint in checkpoint.pt: it is refused as a fresh start,
    continued by --resume latest and written back there (no second checkpoint beside it)."""
    argv = ["--loss", "halo", *common(tiny_cifar, tmp_path), "--epochs", "1", "--name", "old"]
    assert cifar.run(parse(argv)) == 0
    run = tmp_path / "old" / "halo"
    (run / "checkpoints" / "latest.pt").rename(run / "checkpoint.pt")
    (run / "checkpoints").rmdir()
    with pytest.raises(FileExistsError, match="already holds a run"):
        cifar.run(parse(argv))
    assert cifar.run(parse([*argv[:-4], "--epochs", "2", "--name", "old", "--resume", "latest"])) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2 and not (run / "checkpoints").exists()


def test_resume_gives_the_same_weights(tiny_cifar, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, a crash, --resume latest, 1 more epoch."""
    from dataclasses import replace

    argv = ["--loss", "halo", *common(tiny_cifar, tmp_path), "--epochs", "2"]
    config = cifar.configs_from_args(parse(argv))[0]
    data = cifar.load_data(config)
    cifar.train(replace(config, name="straight"), data)

    class Crash(Exception):
        pass

    save = cifar.save_state_file

    def save_then_crash(path, state):
        save(path, state)
        raise Crash

    monkeypatch.setattr(cifar, "save_state_file", save_then_crash)
    with pytest.raises(Crash):
        cifar.train(replace(config, name="split"), data)
    monkeypatch.setattr(cifar, "save_state_file", save)
    cifar.train(replace(config, name="split", resume="latest"), data)
    a = torch.load(tmp_path / "straight" / "halo" / "checkpoints" / "latest.pt", weights_only=True)  # plain values only
    b = torch.load(tmp_path / "split" / "halo" / "checkpoints" / "latest.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["criterion"]["gamma"], b["criterion"]["gamma"])
    log = [json.loads(line) for line in (tmp_path / "split" / "halo" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 1, 2] and log[1] == {"epoch": 1, "resumed": True, "changed": []}
    saved = json.loads((tmp_path / "split" / "halo" / "config.json").read_text())
    assert saved["resume"] is None  # the run's config, not rewritten by the resume


def test_a_run_is_a_contract(tiny_cifar, tmp_path, capsys):
    """A resume continues the run that was started (options that define it must match; the log says what a
    resume changed), a torn last log line is dropped, a crafted checkpoint is refused without running, and a
    second process on a run folder stops before it writes anything."""
    import pickle
    from dataclasses import replace

    from halo_embed.cli import main
    from halo_embed.io import claim_for

    argv = ["--loss", "halo", *common(tiny_cifar, tmp_path), "--epochs", "1"]
    assert main(["cifar", *argv, "--name", "run"]) == 0
    run = tmp_path / "run" / "halo"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["cifar", *argv, "--name", "run", "--resume", "latest", "--batch-size", "8", "--lr", "0.3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--batch-size 8 (the run: 32)" in err[0] and "--lr 0.3" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed
    with open(run / "log.jsonl", "a") as handle:  # what a kill during a log write leaves
        handle.write('{"epoch": 2, "lo')
    assert main(["cifar", *argv[:-2], "--epochs", "2", "--name", "run", "--resume", "latest"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 2 and {"epoch": 1, "resumed": True, "changed": ["--epochs 2 (the run: 1)"]} in log

    class Payload:  # a checkpoint that would run code when unpickled
        def __reduce__(self):
            return (exec, ("open(__import__('os').environ['HALO_TEST_MARK'], 'w').write('ran')",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"model": Payload()}))
    mark = tmp_path / "mark"
    import os

    os.environ["HALO_TEST_MARK"] = str(mark)
    try:
        assert main(["cifar", *argv, "--name", "other", "--resume", str(crafted)]) == 2
    finally:
        del os.environ["HALO_TEST_MARK"]
    assert "not loaded (they could run code)" in capsys.readouterr().err and not mark.exists()

    config = cifar.configs_from_args(parse(argv))[0]
    with claim_for(tmp_path / "busy" / "halo", "the test's run"):
        with pytest.raises(ValueError, match="is in use by pid"):
            cifar.train(replace(config, name="busy"))
    assert not (tmp_path / "busy").exists()  # nothing written


@pytest.mark.cuda
@pytest.mark.parametrize("loss", ["halo", "cce"])
def test_training_on_cuda_in_bf16_and_channels_last(tiny_cifar, tmp_path, monkeypatch, loss):
    """On a GPU the recipe trains in bf16 autocast on channels-last batches (the published setting's speed):
    every training forward sees both, and 8 epochs end with finite weights and the accuracy the CPU reaches."""
    from dataclasses import replace

    seen = []
    build = cifar.build

    def build_and_watch(config, num_classes):
        model, criterion = build(config, num_classes)

        def record(module, args):
            x = args[0]
            if module.training:
                seen.append((x.is_cuda, x.is_contiguous(memory_format=torch.channels_last),
                             torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        model.register_forward_pre_hook(record)
        return model, criterion

    monkeypatch.setattr(cifar, "build", build_and_watch)
    config = cifar.configs_from_args(parse(["--loss", loss, *common(tiny_cifar, tmp_path), "--width", "8",
                                            "--batch-size", "16", "--epochs", "8", "--device", "cuda"]))[0]
    cifar.train(replace(config, name="gpu"), cifar.load_data(config))
    assert seen and set(seen) == {(True, True, True, torch.bfloat16)}
    state = torch.load(tmp_path / "gpu" / loss / "checkpoints" / "latest.pt", weights_only=True)
    assert state["epoch"] == 8 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    metrics = json.loads((tmp_path / "gpu" / loss / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] >= 0.7  # as test_both_losses_learn_separable_images on the CPU, in bf16


def test_presets_and_validation():
    config = cifar.apply_preset(cifar.CifarConfig(preset="small", epochs=7), explicit={"epochs"})
    assert config.width == 16 and config.epochs == 7 and config.train_limit == 10000
    medium = cifar.apply_preset(cifar.CifarConfig(preset="medium"), explicit=set())
    assert (medium.width, medium.epochs, medium.train_limit) == (16, 8, 20000)
    # an option given on the command line wins over the preset however it is spelt
    for argv in (["--epochs=7", "--preset", "small"], ["--preset", "small", "--epochs", "7"],
                 ["--epoch", "7", "--preset=small"], ["--preset", "small", "--epochs", "4", "--epochs=7"]):
        config = cifar.configs_from_args(parse(argv))[0]
        assert (config.epochs, config.width, config.train_limit) == (7, 16, 10000), argv
    config = cifar.configs_from_args(parse(["--preset", "large", "--train-limit=300"]))[0]
    assert (config.epochs, config.train_limit) == (6, 300)
    assert cifar.configs_from_args(parse(["--preset", "large"]))[0].train_limit is None
    with pytest.raises(ValueError, match="--seeds must be >= 1, got 0"):
        cifar.validate(cifar.CifarConfig(seeds=0))
    with pytest.raises(ValueError, match="--dataset imagefolder needs --near-ood and --far-ood"):
        cifar.validate(cifar.CifarConfig(dataset="imagefolder"))
    with pytest.raises(ValueError, match="--width must be >= 1"):
        cifar.validate(cifar.CifarConfig(width=0))


def test_init_gamma_option(tiny_cifar, tmp_path):
    assert parse(["--init-gamma", "reference"]).init_gamma is None
    assert parse(["--init-gamma", "2.5"]).init_gamma == 2.5
    with pytest.raises(SystemExit):
        parse(["--init-gamma", "warm"])
    with pytest.raises(ValueError, match="--init-gamma must be a positive temperature or 'reference', got -1.0"):
        cifar.validate(cifar.CifarConfig(init_gamma=-1.0))
    _, criterion = cifar.build(cifar.CifarConfig(loss="halo", width=4, init_gamma=2.5), 10)
    assert criterion.temperature.item() == pytest.approx(2.5)
    _, reference = cifar.build(cifar.CifarConfig(loss="halo", width=4, init_gamma=None), 10)
    assert reference.temperature.item() == pytest.approx(50 / 3)


def test_seeds_report_mean_and_std_and_resume(tiny_cifar, tmp_path):
    """--seeds 2: one run folder per seed and loss, a report whose means are the per-seed means; a second
    invocation with --resume latest trains nothing more and reports the same numbers."""
    argv = ["compare", *common(tiny_cifar, tmp_path), "--epochs", "1", "--name", "multi", "--seeds", "2",
            "--seed", "3", "--resume", "latest"]
    assert cifar.run(parse(argv)) == 0
    root = tmp_path / "multi"
    payload = json.loads((root / "metrics.json").read_text())
    assert payload["seeds"] == [3, 4]
    for loss in ("cce", "halo"):
        per_seed = payload[loss]["per_seed"]
        for seed, run in zip((3, 4), per_seed):
            metrics = json.loads((root / f"seed-{seed}" / loss / "metrics.json").read_text())["metrics"]
            assert run["accuracy"] == metrics["accuracy"]
            assert json.loads((root / f"seed-{seed}" / loss / "config.json").read_text())["seed"] == seed
        accuracies = [run["accuracy"] for run in per_seed]
        assert payload[loss]["mean"]["accuracy"] == pytest.approx(sum(accuracies) / 2)
        assert payload[loss]["std"]["accuracy"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5)
        assert {"far_auroc[msp]", "near_auroc[msp]"} <= set(payload[loss]["mean"])
    assert set(payload["halo"]["mean"]) >= {"far_auroc[not_abstain]", "far_auroc[neg_distance]"}
    report = (root / "report.md").read_text()
    assert "| metric | CCE (mean ± std) | HALO (mean ± std) | CCE (published) | HALO (published) |" in report
    assert "HALO seed 4" in report
    assert "| noise (near) rejected % | grey (far) rejected % |" in report  # each OOD set, not a group mean
    sink = payload["halo"]["per_seed"][0]
    assert sink["rule[sink] far_rejected"] == sink["rule[sink] rejected[grey]"]
    checkpoint = root / "seed-4" / "halo" / "checkpoints" / "latest.pt"
    stamp = checkpoint.stat().st_mtime_ns
    assert cifar.run(parse(argv)) == 0
    assert checkpoint.stat().st_mtime_ns == stamp  # resumed at its last epoch: nothing trained, nothing saved
    assert json.loads((root / "metrics.json").read_text())["halo"]["per_seed"] == payload["halo"]["per_seed"]
    with pytest.raises(ValueError, match="--resume with --seeds takes 'latest'"):
        bad = [*argv[:-1], "some/checkpoint.pt"]
        cifar.run(parse(bad))


def test_imagefolder_dataset_with_any_number_of_classes(tiny_cifar, tmp_path):
    """--dataset imagefolder: K from the folders (here 4 of the 10), D = K, no published columns."""
    root = tmp_path / "four"
    for split in ("train", "test"):
        for name in NAMES[:4]:
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / name).symlink_to(tiny_cifar / split / name)
    argv = ["compare", *common(tiny_cifar, tmp_path), "--data-dir", str(root), "--dataset", "imagefolder",
            "--epochs", "1", "--name", "four"]
    assert cifar.run(parse(argv)) == 0
    report = (tmp_path / "four" / "report.md").read_text()
    assert "| metric | CCE | HALO |" in report and "(published)" not in report
    config = json.loads((tmp_path / "four" / "halo" / "metrics.json").read_text())["config"]
    assert config["dataset"] == "imagefolder"
    checkpoint = torch.load(tmp_path / "four" / "halo" / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["model"]["centroids"].shape == (4, 4)
    with pytest.raises(FileNotFoundError, match="needs .*/train/<class>/ and .*/test/<class>/ folders"):
        cifar.load_data(cifar.CifarConfig(dataset="imagefolder", data_dir=str(tmp_path / "nowhere"),
                                          near_ood=["x"], far_ood=["y"]))


def test_calibration_split_is_per_class_disjoint_and_seed_free():
    labels = torch.arange(5).repeat_interleave(torch.tensor([10, 20, 30, 40, 50]))
    data = ImageArray(torch.arange(150).view(150, 1, 1, 1).expand(150, 3, 1, 1).to(torch.uint8), labels, "x",
                      [str(c) for c in range(5)])
    kept, held_out = data.split_per_class(0.1)
    assert torch.bincount(held_out.labels).tolist() == [1, 2, 3, 4, 5]
    ids = lambda part: set(part.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(kept) | ids(held_out) == set(range(150)) and not ids(kept) & ids(held_out)
    assert ids(data.split_per_class(0.1)[1]) == ids(held_out)  # fixed: every seed holds out the same images
    with pytest.raises(ValueError, match="class '0' has 10 image\\(s\\): holding out 0.01 of them leaves no held-out"):
        data.split_per_class(0.01)
    with pytest.raises(ValueError, match="class '0' has 10 image\\(s\\): holding out 0.96 of them leaves no training"):
        data.split_per_class(0.96)
    absent = ImageArray(data.images[:10], labels[:10], "x", ["0", "1"])
    with pytest.raises(ValueError, match="class '1' has 0 image"):
        absent.split_per_class(0.5)


@pytest.mark.parametrize("args, message", [
    (["--calibration-split", "0"], "--calibration-split must be in (0, 1), got 0.0"),
    (["--calibration-split", "1"], "--calibration-split must be in (0, 1), got 1.0"),
    (["--calibration-split", "nan"], "--calibration-split must be in (0, 1), got nan"),
    (["--calibration-split", "0.01"], "class 'airplane' has 24 image(s): holding out 0.01 of them leaves no held-out"),
    (["--calibration-split", "0.99"], "class 'airplane' has 24 image(s): holding out 0.99 of them leaves no training"),
    (["--calibration-ood", "{root}/nowhere.npz"], "nowhere.npz"),
    (["--keep", "0"], "--keep must be in (0, 1], got 0.0"),
])
def test_a_bad_calibration_is_refused_before_training(tiny_cifar, tmp_path, capsys, args, message):
    from halo_embed.cli import main

    argv = ["cifar", "compare", *common(tiny_cifar, tmp_path / "runs"), "--epochs", "1",
            *(a.format(root=tiny_cifar) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_the_decision_is_calibrated_on_held_out_images_and_saved(tiny_cifar, tmp_path):
    """The run ends with HALO's sink calibrated on the held-out split (saved in the checkpoint, reported) and
    every score of both losses thresholded by the same rule; with --calibration-ood the rule separates."""
    argv = ["compare", *common(tiny_cifar, tmp_path), "--epochs", "2", "--name", "dec", "--keep", "0.9"]
    assert cifar.run(parse(argv)) == 0
    halo = json.loads((tmp_path / "dec" / "halo" / "metrics.json").read_text())["metrics"]
    cce = json.loads((tmp_path / "dec" / "cce" / "metrics.json").read_text())["metrics"]
    assert halo["n_calibration"] == cce["n_calibration"] == 20 and halo["n_train"] == 220
    decision = halo["decision"]
    assert decision["primary"] == "sink" and set(decision["rules"]) == {"reference", "sink", "sink+distance"}
    assert set(decision["scores"]) == {"not_abstain", "msp", "neg_distance", "energy"}
    assert set(cce["decision"]["scores"]) == {"msp", "max_logit", "energy"} and cce["decision"]["rules"] == {}
    sink = decision["rules"]["sink"]
    assert sink["calibration"]["n_id"] == 20 and sink["calibration"]["held_out_kept"] >= 0.9
    assert halo["abstain_rate_known"] == pytest.approx(1 - sink["id_kept"])  # the head decides with the calibrated bias
    assert set(sink["ood_rejected"]) == {"noise", "grey"}
    state = torch.load(tmp_path / "dec" / "halo" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["decision"] == sink["calibration"]
    report = (tmp_path / "dec" / "report.md").read_text()
    assert "thresholds set to keep 90 % of 20 held-out training images" in report
    assert "| HALO decision `sink` (the run's) |" in report and "| CCE `msp` thresholded |" in report
    assert (tmp_path / "dec" / "halo" / "risk_coverage.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="--calibration-ood .*noise.npz is also a test OOD set"):
        cifar.run(parse([*argv, "--calibration-ood", str(tiny_cifar / "noise.npz")]))
    held_out_noise = tmp_path / "held_out_noise.npz"
    np.savez(held_out_noise, x=np.random.default_rng(9).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    separated = ["--loss", "halo", *argv[1:-2], "--name", "sep", "--calibration-ood", str(held_out_noise),
                 "--decision", "sink+distance"]
    assert cifar.run(parse(separated)) == 0
    decision = json.loads((tmp_path / "sep" / "halo" / "metrics.json").read_text())["metrics"]["decision"]
    assert decision["held_out_ood"] == ["held_out_noise"] and decision["primary"] == "sink+distance"
    assert decision["rules"]["sink+distance"]["calibration"]["n_ood"] == 30
    assert "best balanced accuracy" in decision["scores"]["msp"]["rule"]


def test_temperature_learning_rate_and_schedule():
    """--temperature-lr scales the temperature's rate; --temperature-schedule constant keeps it at its peak after
    the warm-up while the network's decays."""
    config = cifar.CifarConfig(loss="halo", width=4, epochs=4, warmup_epochs=1, temperature_lr=10.0,
                               temperature_schedule="constant")
    model, criterion = cifar.build(config, 10)
    optimizer, scheduler = cifar.optimizer_and_schedule(config, model, criterion, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        rates.append([group["lr"] for group in optimizer.param_groups])
    assert rates[3] == [pytest.approx(0.1), pytest.approx(1.0)]  # the end of the warm-up
    assert rates[-2][0] < 0.01 and rates[-2][1] == pytest.approx(1.0)
    cosine = cifar.CifarConfig(loss="halo", width=4, epochs=4, temperature_lr=0.5)
    optimizer, scheduler = cifar.optimizer_and_schedule(cosine, model, criterion, steps_per_epoch=5)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * optimizer.param_groups[0]["lr"])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--temperature-lr must be a finite number >= 0"):
            cifar.validate(cifar.CifarConfig(temperature_lr=bad))
