import json
import subprocess
import sys

import pytest
import torch

from conftest import shape_images
from halo_embed import geometry
from halo_embed.clip import (
    HALOCLIP,
    AlignmentScorer,
    PrototypeClassifier,
    load_backbone,
    load_checkpoint,
    save_checkpoint,
)

CAPTIONS = ["a red circle", "a blue square in the corner", "a small green triangle", "a big yellow star",
            "a purple ring at the top", "an orange cross", "a white square", "a black circle on the left"]


def batch(backbone, n=8, seed=0, train=False):
    transform = backbone.image_transform(train=train)
    pixels = torch.stack([transform(im) for im in shape_images(n, seed)])
    return pixels, backbone.tokenize(CAPTIONS[:n])


def calibrated(backbone, num_candidates=8):
    model = HALOCLIP(backbone, num_candidates=num_candidates)
    model.calibrate([batch(backbone, 8, s) for s in range(3)])
    return model


def test_open_clip_user_paths_agree(tiny_model_dirs):
    """create_model_and_transforms(name, pretrained=FILE) and local-dir: give the same model."""
    by_file = load_backbone("open_clip", tiny_model_dirs["open_clip_name"], pretrained=str(tiny_model_dirs["open_clip_weights"]))
    by_dir = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    pixels, tokens = batch(by_file)
    torch.testing.assert_close(by_file.encode_image(pixels), by_dir.encode_image(pixels))
    torch.testing.assert_close(by_file.encode_text(tokens), by_dir.encode_text(tokens))


def test_backbone_features_are_unnormalised(tiny_backbone):
    pixels, tokens = batch(tiny_backbone)
    image, text = tiny_backbone.encode_image(pixels), tiny_backbone.encode_text(tokens)
    assert image.shape == text.shape == (8, tiny_backbone.embed_dim)
    assert not torch.allclose(image.norm(dim=1), torch.ones(8), atol=1e-3)


def test_adapter_calibration_centres_and_scales(tiny_backbone):
    model = calibrated(tiny_backbone)
    assert bool(model.adapter.calibrated)
    pixels, tokens = batch(tiny_backbone, 8, 0)
    with torch.no_grad():
        for features in (model.encode_image(pixels), model.encode_text(tokens)):
            assert features.dtype == torch.float32
            # calibrated on these batches (among others): roughly centred, unit mean square
            assert 0.3 < features.pow(2).mean().item() < 3.0
    with pytest.raises(ValueError, match="text_features has D=3, the adapter has D="):
        model.adapter.calibrate(torch.randn(4, tiny_backbone.embed_dim), torch.randn(4, 3))


def test_training_step_and_locking(tiny_backbone):
    model = calibrated(tiny_backbone)
    model.backbone.lock_image()
    model.backbone.set_grad_checkpointing(True)
    model.train()
    pixels, tokens = batch(tiny_backbone, seed=5, train=True)
    loss, parts = model(pixels, tokens, return_parts=True)
    assert torch.isfinite(loss) and set(parts) >= {"image_to_text", "text_to_image", "radial"}
    loss.backward()
    assert model.loss.gamma.grad is not None
    image_tower = [p for n, p in model.backbone.named_parameters() if "visual" in n or "vision" in n]
    text_tower = [p for n, p in model.backbone.named_parameters() if ("text" in n or "token" in n) and p.requires_grad]
    assert image_tower and all(not p.requires_grad for p in image_tower)
    assert text_tower and any(p.grad is not None and p.grad.abs().sum() > 0 for p in text_tower)


def test_checkpoint_round_trip(tiny_backbone, tmp_path):
    model = calibrated(tiny_backbone)
    with torch.no_grad():
        model.loss.gamma.add_(0.5)  # a "trained" temperature must survive the round trip
    save_checkpoint(model, tmp_path / "ckpt", extra={"step": 7})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["extra"] == {"step": 7} and config["backbone"]["family"] == tiny_backbone.family
    loaded = load_checkpoint(tmp_path / "ckpt")
    pixels, tokens = batch(tiny_backbone, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.eval().encode_image(pixels))
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens))
    assert loaded.abstain_bias == model.abstain_bias
    torch.testing.assert_close(loaded.gamma, model.gamma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folders left


def test_checkpoint_save_is_atomic(tiny_model_dirs, tmp_path, monkeypatch):
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    model = calibrated(backbone)
    save_checkpoint(model, tmp_path / "ckpt", extra={"version": "old"})

    import safetensors.torch

    def crash(model, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ckpt", extra={"version": "new"})
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["extra"] == {"version": "old"}
    load_checkpoint(tmp_path / "ckpt")  # still loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors_name_the_file(tiny_model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*missing-ckpt does not exist"):
        load_checkpoint(tmp_path / "missing-ckpt")
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    ckpt = save_checkpoint(calibrated(backbone), tmp_path / "ckpt")
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is damaged"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json is damaged"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        load_checkpoint(ckpt)


def test_scorer_scores_ranks_and_agrees_with_geometry(tiny_backbone, tmp_path):
    model = calibrated(tiny_backbone)
    scorer = AlignmentScorer(model)
    images = shape_images(4, seed=9)
    scores = scorer.score(images, CAPTIONS[:4])
    img, txt = scorer.encode_images(images), scorer.encode_texts(CAPTIONS[:4])
    expected_logit = model.gamma * (1 - (img - txt).pow(2).mean(1))  # the image on the unit shell
    torch.testing.assert_close(scores.logit, expected_logit.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.probability, torch.sigmoid(scores.logit - model.abstain_bias))
    assert torch.equal(scores.accept, scores.logit >= model.abstain_bias)
    ranking = scorer.rank(images, CAPTIONS, k=3)
    torch_ranking = scorer.rank(images, CAPTIONS, k=3, backend="torch")
    assert torch.equal(ranking.result.indices, torch_ranking.result.indices)
    shifted = geometry.shifted_logits(img, scorer.encode_texts(CAPTIONS), model.gamma.detach())
    assert torch.equal(ranking.result.indices[:, 0], shifted.argmax(1))
    # rank's abstain decision is score()'s decision for the best caption
    best = scorer.score(images, [CAPTIONS[i] for i in ranking.result.indices[:, 0].tolist()])
    assert torch.equal(ranking.result.abstained, ~best.accept)
    records = ranking.to_records()
    assert len(records) == 4 and len(records[0]["top"]) == 3 and records[0]["top"][0]["candidate"] in CAPTIONS
    by_image = scorer.rank_images(CAPTIONS[:2], images, k=2)
    assert by_image.result.indices.shape == (2, 2)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a non-empty string"):
        scorer.score(images[:2], ["a red circle", "  "])
    with pytest.raises(ValueError, match="one text per image: got 4 images and 3 texts"):
        scorer.score(images, CAPTIONS[:3])


def test_prototype_zero_shot_and_fine_tuning(tiny_backbone):
    model = calibrated(tiny_backbone)
    classifier = PrototypeClassifier(model, ["circle", "square"], templates=["a photo of a {}.", "a {} shape"])
    pixels, _ = batch(tiny_backbone, 8, seed=1)
    labels = torch.tensor([0, 1] * 4)  # shape_images alternates squares (even) and circles (odd)
    labels = 1 - labels
    out = classifier.predict(pixels)
    assert out.probs.shape == (8, 3) and set(out.labels.tolist()) <= {-1, 0, 1}
    optimizer = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(15):
        embeddings, centroids = classifier(pixels)
        loss, _ = classifier.loss(embeddings, labels, centroids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    with pytest.raises(ValueError, match="class_names must be distinct"):
        PrototypeClassifier(model, ["a", "a"])


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """The CLI in-process (exit code, stdout, stderr), as a user's shell would see them."""
    from halo_embed.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def test_cli_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "halo_embed.cli", "score", "--checkpoint", "/no/such/ckpt",
                             "--pairs", "/no/such.csv"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "halo-embed score: error: pairs file not found: /no/such.csv"


def test_cli_score_single_and_batch(tiny_model_dirs, tmp_path, run_cli):
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    ckpt = save_checkpoint(calibrated(backbone), tmp_path / "ckpt")
    for i, image in enumerate(shape_images(3)):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")

    ok = run_cli("score", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img0.png"), "--text", "a red circle")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(("ACCEPT", "REJECT")) and "p(belongs)" in ok.stdout
    as_json = run_cli("score", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img0.png"), "--text", "x", "--json")
    assert 0 <= json.loads(as_json.stdout)["probability"] <= 1

    for args, message in [
        (("--image", str(tmp_path / "nope.png"), "--text", "a"), "image file not found"),
        (("--image", str(tmp_path / "broken.jpg"), "--text", "a"), "cannot read image"),
        (("--image", str(tmp_path / "img0.png"), "--text", " "), "--text must be a non-empty caption"),
    ]:
        bad = run_cli("score", "--checkpoint", str(ckpt), *args)
        assert bad.returncode == 2 and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    missing = run_cli("score", "--checkpoint", str(tmp_path / "nockpt"), "--image", str(tmp_path / "img0.png"), "--text", "a")
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\nimg0.png,a red circle\nimg1.png,\nmissing.png,a dog\nbroken.jpg,a cat\nimg2.png,a blue square\n")
    result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(pairs), "--output", str(tmp_path / "out.csv"))
    assert result.returncode == 1
    for row in (2, 3, 4):
        assert f"row {row}:" in result.stderr
    assert "scored 2 of 5 pairs" in result.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "out.csv").read_text().splitlines()))
    assert [r["error"] == "" for r in rows] == [True, False, False, False, True]
    assert rows[0]["probability"] and rows[1]["probability"] == ""
    out_json = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(pairs), "--output", str(tmp_path / "out.json"))
    assert len(json.loads((tmp_path / "out.json").read_text())["pairs"]) == 5 and out_json.returncode == 1


def test_adapter_refuses_identical_samples(tiny_backbone):
    model = HALOCLIP(tiny_backbone, num_candidates=8)
    same = torch.randn(1, tiny_backbone.embed_dim).repeat(6, 1)
    with pytest.raises(ValueError, match=r"text_features are \(nearly\) identical"):
        model.adapter.calibrate(torch.randn(6, tiny_backbone.embed_dim), same)
