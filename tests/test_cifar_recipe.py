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
    assert cifar.run(parse(argv), argv) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| metric | CCE | HALO | CCE (published) | HALO (published) |" in report
    assert "| ID accuracy % |" in report and "96.53" in report
    for loss in ("cce", "halo"):
        metrics = json.loads((tmp_path / "cmp" / loss / "metrics.json").read_text())["metrics"]
        assert 0 <= metrics["accuracy"] <= 1 and set(metrics["near"]) == {"noise"} and set(metrics["far"]) == {"grey"}
        for png in ("reliability.png", "scores.png", "pca.png"):
            assert (tmp_path / "cmp" / loss / png).stat().st_size > 5000
    halo = json.loads((tmp_path / "cmp" / "halo" / "metrics.json").read_text())["metrics"]
    assert set(halo["ood"]) == {"not_abstain", "msp", "neg_distance", "energy"}


def test_resume_gives_the_same_weights(tiny_cifar, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, a crash, --resume latest, 1 more epoch."""
    from dataclasses import replace

    argv = ["--loss", "halo", *common(tiny_cifar, tmp_path), "--epochs", "2"]
    config = cifar.configs_from_args(parse(argv), argv)[0]
    data = cifar.load_data(config)
    cifar.train(replace(config, name="straight"), data)

    class Crash(Exception):
        pass

    save = cifar.save_training_state

    def save_then_crash(path, state):
        save(path, state)
        raise Crash

    monkeypatch.setattr(cifar, "save_training_state", save_then_crash)
    with pytest.raises(Crash):
        cifar.train(replace(config, name="split"), data)
    monkeypatch.setattr(cifar, "save_training_state", save)
    cifar.train(replace(config, name="split", resume="latest"), data)
    a = torch.load(tmp_path / "straight" / "halo" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "halo" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["criterion"]["gamma"], b["criterion"]["gamma"])


def test_presets_and_validation():
    config = cifar.apply_preset(cifar.CifarConfig(preset="small", epochs=7), explicit={"epochs"})
    assert config.width == 16 and config.epochs == 7 and config.train_limit == 10000
    with pytest.raises(ValueError, match="--width must be >= 1"):
        cifar.validate(cifar.CifarConfig(width=0))
