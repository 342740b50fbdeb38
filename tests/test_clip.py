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
    FeatureAdapter,
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
    model.fit_adapter([batch(backbone, 8, s) for s in range(3)])
    return model


def test_open_clip_user_paths_agree(tiny_model_dirs):
    """create_model_and_transforms(name, pretrained=FILE) and local-dir: give the same model."""
    by_file = load_backbone("open_clip", tiny_model_dirs["open_clip_name"], pretrained=str(tiny_model_dirs["open_clip_weights"]))
    by_dir = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    pixels, tokens = batch(by_file)
    torch.testing.assert_close(by_file.encode_image(pixels), by_dir.encode_image(pixels))
    torch.testing.assert_close(by_file.encode_text(tokens), by_dir.encode_text(tokens))


def test_truncation_is_detected_at_the_context_length(tiny_backbone):
    length = tiny_backbone.context_length
    texts = ["a dog", "word " * (length - 2), "word " * (length - 1), "a caption " + "junk " * 9960]
    # start + end tokens + one per word: length - 2 words fit exactly, one more is cut
    assert tiny_backbone.truncated(texts).tolist() == [False, False, True, True]
    scores = AlignmentScorer(calibrated(tiny_backbone)).score(shape_images(4), texts)
    assert scores.truncated.tolist() == [False, False, True, True]
    assert [r["truncated"] for r in scores.to_records()] == [False, False, True, True]


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
        model.adapter.fit(torch.randn(4, tiny_backbone.embed_dim), torch.randn(4, 3))


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
    torch.testing.assert_close(loaded.temperature, model.temperature)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folders left
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as the config


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
    # a save killed outright (no cleanup ran) leaves its staging folder; the next save removes it
    monkeypatch.undo()
    (tmp_path / ".ckpt.tmp-123-abcd").mkdir()
    (tmp_path / ".ckpt.tmp-123-abcd" / "model.safetensors").write_bytes(b"half")
    save_checkpoint(model, tmp_path / "ckpt", extra={"version": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors_name_the_file(tiny_model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*missing-ckpt does not exist"):
        load_checkpoint(tmp_path / "missing-ckpt")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="checkpoint .*a-file is a file; give the checkpoint folder"):
        load_checkpoint(tmp_path / "a-file")
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


def test_checkpoint_with_nan_weights_is_refused_and_nan_embeddings_never_accept(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    model = calibrated(backbone)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    # a damaged data region under an intact header: the file is valid safetensors, one weight is NaN
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 4)
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "halo-embed/haloclip"})
    with pytest.raises(ValueError, match=rf"model.safetensors is damaged: {name} contains NaN or inf"):
        load_checkpoint(ckpt)
    scorer = AlignmentScorer(model)
    images, texts = torch.randn(3, backbone.embed_dim), torch.randn(3, backbone.embed_dim)
    images[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image_embeddings has NaN or inf values in row\(s\) \[1\]"):
        scorer.score_embeddings(images, texts)
    texts[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"text_embeddings has NaN or inf values in row\(s\) \[2\]"):
        scorer.score_embeddings(images.nan_to_num(), texts)
    with pytest.raises(TypeError, match="image_embeddings must be a torch.Tensor"):
        scorer.score_embeddings([[0.0]], texts)


def test_scorer_scores_ranks_and_agrees_with_geometry(tiny_backbone, tmp_path):
    model = calibrated(tiny_backbone)
    scorer = AlignmentScorer(model)
    images = shape_images(4, seed=9)
    scores = scorer.score(images, CAPTIONS[:4])
    img, txt = scorer.encode_images(images), scorer.encode_texts(CAPTIONS[:4])
    expected_logit = model.temperature * (1 - (img - txt).pow(2).mean(1))  # the image on the unit shell
    torch.testing.assert_close(scores.logit, expected_logit.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.probability, torch.sigmoid(scores.logit - model.abstain_bias))
    assert torch.equal(scores.accept, scores.logit >= model.abstain_bias)
    ranking = scorer.rank(images, CAPTIONS, k=3)
    torch_ranking = scorer.rank(images, CAPTIONS, k=3, backend="torch")
    assert torch.equal(ranking.result.indices, torch_ranking.result.indices)
    shifted = geometry.shifted_logits(img, scorer.encode_texts(CAPTIONS), model.temperature.detach())
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
    with pytest.raises(TypeError, match="images must be a list .*got a single str; wrap it in a list"):
        scorer.score("dog.jpg", "a dog")
    with pytest.raises(TypeError, match="texts must be a list .*got a single str"):
        scorer.score(images[:1], "a dog")


def test_prototype_zero_shot_and_fine_tuning(tiny_backbone):
    model = calibrated(tiny_backbone)
    classifier = PrototypeClassifier(model, ["circle", "square"], templates=["a photo of a {}.", "a {} shape"])
    pixels, _ = batch(tiny_backbone, 8, seed=1)
    labels = torch.tensor([0, 1] * 4)  # shape_images alternates squares (even) and circles (odd)
    labels = 1 - labels
    out = classifier.predict(pixels)
    assert out.probs.shape == (8, 3)
    # the decision is the argmax over [circle, square, sink], the sink's column meaning ABSTAIN (-1)
    top = out.probs.argmax(dim=1)
    torch.testing.assert_close(out.labels, torch.where(top == 2, torch.full_like(top, -1), top))
    torch.testing.assert_close(out.abstained, top == 2)
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


def test_prototype_frozen_text_computes_the_prompts_once_and_init_gamma(tiny_backbone):
    model = calibrated(tiny_backbone)
    names, templates = ["circle", "square", "star"], ["a photo of a {}.", "a {} shape"]
    with pytest.raises(ValueError, match="frozen_text=True, but the text tower has trainable parameters"):
        PrototypeClassifier(model, names, templates, frozen_text=True).centroids()
    model.backbone.lock_text()
    every_call = PrototypeClassifier(model, names, templates)
    cached = PrototypeClassifier(model, names, templates, frozen_text=True, init_gamma=2.0)
    calls = []
    encode_text = model.backbone.encode_text
    model.backbone.encode_text = lambda tokens: calls.append(1) or encode_text(tokens)
    try:
        first = cached.centroids()
        torch.testing.assert_close(cached.centroids(), first)
        assert len(calls) == 1  # the prompts went through the text tower once
        torch.testing.assert_close(first, every_call.centroids())
    finally:
        del model.backbone.encode_text
    assert not first.requires_grad
    # the classification loss starts at init_gamma, or else at the CLIP model's temperature
    torch.testing.assert_close(cached.loss.temperature.reshape(()), torch.tensor(2.0))
    torch.testing.assert_close(every_call.loss.temperature.reshape(()), model.temperature.reshape(()))
    with pytest.raises(TypeError, match="frozen_text must be a bool"):
        PrototypeClassifier(model, names, frozen_text="yes")


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
    record = json.loads(as_json.stdout)
    # the printed probability is HALO's two-candidate softmax of the printed logit against the abstain bias
    expected = torch.sigmoid(torch.tensor(record["logit"] - record["abstain_bias"], dtype=torch.float64))
    assert record["probability"] == pytest.approx(float(expected), rel=1e-5, abs=1e-12)
    assert record["accept"] == (record["logit"] >= record["abstain_bias"])

    for args, message in [
        (("--image", str(tmp_path / "nope.png"), "--text", "a"), "image file not found"),
        (("--image", str(tmp_path / "broken.jpg"), "--text", "a"), "cannot read image"),
        (("--image", str(tmp_path / "img0.png"), "--text", " "), "--text must be a non-empty caption"),
        (("--image", str(tmp_path / "img0.png"), "--text", "a", "--device", "banana"),
         "--device must be a device such as cpu, cuda or cuda:1, got 'banana'"),
        (("--image", str(tmp_path / "img0.png"), "--text", "a", "--device", "cuda:7"),
         "--device is cuda:7, but" if torch.cuda.is_available() else
         "--device is cuda:7, but no CUDA GPU is available here; use cpu"),
        (("--image", str(tmp_path / "img0.png"), "--text", "a", "--batch-size", "0"), "--batch-size must be >= 1"),
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
        assert f"pairs.csv, line {row + 1} (row {row}):" in result.stderr
    assert "scored 2 of 5 pairs" in result.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "out.csv").read_text().splitlines()))
    assert [r["error"] == "" for r in rows] == [True, False, False, False, True]
    assert rows[0]["probability"] and rows[1]["probability"] == ""
    out_json = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(pairs), "--output", str(tmp_path / "out.json"))
    assert len(json.loads((tmp_path / "out.json").read_text())["pairs"]) == 5 and out_json.returncode == 1

    # the csv module's rules: quoted captions with line breaks and commas; a bad byte rejects its row only
    odd = tmp_path / "odd.csv"
    odd.write_bytes(b'image,caption\nimg0.png,"a red circle,\nin two lines"\nimg1.png,a \xff blue square\n'
                    b'img2.png,"a ""quoted"" caption, with a comma"\n')
    result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(odd), "--output", str(tmp_path / "odd.json"))
    pairs_out = json.loads((tmp_path / "odd.json").read_text())["pairs"]
    assert result.returncode == 1 and "odd.csv, line 4 (row 2): not valid UTF-8" in result.stderr
    assert [p["text"] for p in pairs_out] == ["a red circle,\nin two lines", "a \ufffd blue square",
                                              'a "quoted" caption, with a comma']
    assert [p["line"] for p in pairs_out] == [2, 4, 5] and pairs_out[1]["probability"] is None
    long = tmp_path / "long.csv"
    long.write_text("image,caption\nimg0.png,\"" + "x" * 200_000 + "\"\n")  # over csv's default field limit
    assert run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(long), "--output",
                   str(tmp_path / "long.json")).returncode == 0
    nowhere = run_cli("score", "--checkpoint", str(tmp_path / "nockpt"), "--pairs", str(pairs),
                      "--output", str(tmp_path / "no" / "such" / "out.csv"))
    assert nowhere.returncode == 2 and "such/out.csv cannot be written: the folder" in nowhere.stderr
    assert "does not exist" in nowhere.stderr  # before the (missing) checkpoint is even looked at
    # a caption longer than the text tower reads: scored with a warning, or rejected with --strict-text
    context = backbone.context_length
    long_caption = "a red circle " + "junk " * (3 * context)
    (tmp_path / "long_caption.csv").write_text(f"image,caption\nimg0.png,a red circle\nimg1.png,{long_caption}\n")
    for strict, code in ((False, 0), (True, 1)):
        out = tmp_path / f"long_caption_{strict}.json"
        result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(tmp_path / "long_caption.csv"),
                         "--output", str(out), *(["--strict-text"] if strict else []))
        assert result.returncode == code, result.stderr
        assert "long_caption.csv, line 3 (row 2): " in result.stderr and f"{context} tokens" in result.stderr
        assert "1 caption(s) longer than the text tower reads" in result.stderr
        rows_out = json.loads(out.read_text())["pairs"]
        assert rows_out[0]["truncated"] is False
        assert (rows_out[1]["probability"] is None) == strict and rows_out[1]["truncated"] is (None if strict else True)
    single = run_cli("score", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img0.png"), "--text", long_caption,
                     "--strict-text")
    assert single.returncode == 2 and f"--text is longer than the {context} tokens" in single.stderr
    big = run_cli("score", "--checkpoint", str(ckpt), "--image", str(tmp_path / "img0.png"), "--text", "a",
                  "--max-image-pixels", "100")
    assert big.returncode == 2 and "over the limit of 100" in big.stderr
    # more rows than are decoded at a time: every row scored once, in order, the bad one reported by line
    many = ["image,caption"] + [f"img{i % 3}.png,caption {i}" for i in range(300)]
    many[281] = "missing.png,caption 280"
    (tmp_path / "many.csv").write_text("\n".join(many) + "\n")
    result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(tmp_path / "many.csv"),
                     "--output", str(tmp_path / "many.json"), "--batch-size", "7")
    many_out = json.loads((tmp_path / "many.json").read_text())["pairs"]
    assert result.returncode == 1 and "scored 299 of 300 pairs" in result.stderr
    assert "many.csv, line 282 (row 281): image file not found" in result.stderr
    assert [r["text"] for r in many_out] == [f"caption {i}" for i in range(300)]
    assert sum(r["probability"] is None for r in many_out) == 1
    (tmp_path / "empty.csv").write_text("")
    empty = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(tmp_path / "empty.csv"))
    assert empty.returncode == 2 and "empty.csv is empty: it needs a header row naming the columns" in empty.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text('image,caption\nimg0.png,"an unterminated quote\nimg1.png,a caption\n')
    result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(broken))
    assert result.returncode == 2 and "broken.csv, line 3: unexpected end of data" in result.stderr
    commas = tmp_path / "commas.csv"
    commas.write_text("image,caption\nimg0.png,a red circle, on grey\nimg1.png,a square\n")
    result = run_cli("score", "--checkpoint", str(ckpt), "--pairs", str(commas))
    assert result.returncode == 1
    assert "commas.csv, line 2 (row 1): 3 fields, the header has 2 (quote fields with commas)" in result.stderr


def test_running_normalization_uses_batch_statistics_in_training_and_running_ones_for_scoring():
    g = torch.Generator().manual_seed(0)
    adapter = FeatureAdapter(6, normalization="running", momentum=0.25)
    adapter.fit(3 + 2 * torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g))
    center0, scale0 = adapter.image_center.clone(), adapter.image_scale.clone()
    text_center0 = adapter.text_center.clone()
    x = (5 + 0.5 * torch.randn(16, 6, generator=g, dtype=torch.float64)).requires_grad_()
    out = adapter.train()(x, "image")
    # slow reference: the batch's own mean and RMS around it, with gradients through both
    reference = (x - x.mean(0)) / (x - x.mean(0)).pow(2).mean().sqrt()
    torch.testing.assert_close(out, reference.float())
    weights = torch.randn(16, 6, generator=g)
    grad, = torch.autograd.grad((out * weights).sum(), x)
    grad_reference, = torch.autograd.grad((reference * weights.double()).sum(), x)
    torch.testing.assert_close(grad, grad_reference, rtol=1e-4, atol=1e-5)
    # running statistics moved a quarter of the way to the batch's (mean square, not its root)
    batch_mean, batch_ms = x.detach().mean(0).float(), (x.detach() - x.detach().mean(0)).pow(2).mean().float()
    torch.testing.assert_close(adapter.image_center, center0 + 0.25 * (batch_mean - center0))
    torch.testing.assert_close(adapter.image_scale.pow(-2), 0.75 * scale0.pow(-2) + 0.25 * batch_ms)
    torch.testing.assert_close(adapter.text_center, text_center0, rtol=0, atol=0)  # the other modality untouched
    # evaluation, and training steps without gradients, use the running statistics and leave them alone
    running = (adapter.image_center.clone(), adapter.image_scale.clone())
    for scoring in (adapter.eval(), adapter.train()):
        with torch.no_grad():
            torch.testing.assert_close(scoring(x.detach(), "image"), ((x.detach() - running[0]) * running[1]).float())
    torch.testing.assert_close(adapter.image_center, running[0])
    # a single row has no spread to measure: the running statistics are used
    one = adapter.train()(x[:1].detach().float(), "image")
    torch.testing.assert_close(one, (x[:1].detach().float() - running[0]) * running[1])
    assert "normalization='running'" in repr(adapter)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"normalization": "batch"}, ValueError, "normalization must be one of"),
    ({"momentum": 0.0}, ValueError, "momentum must be > 0"),
    ({"momentum": 1.5}, ValueError, "momentum must be <= 1"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a real number"),
])
def test_adapter_validates_its_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureAdapter(8, **kwargs)


def test_running_normalization_checkpoint_scores_as_trained(tiny_backbone, tmp_path):
    model = HALOCLIP(tiny_backbone, num_candidates=8, normalization="running", momentum=0.3)
    model.fit_adapter([batch(tiny_backbone, 8, s) for s in range(3)])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(3):
        model(*batch(tiny_backbone, 8, 10 + step, train=True)).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["adapter"] == {
        "normalization": "running", "momentum": 0.3}
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.adapter.normalization == "running"
    images = shape_images(4, seed=21)
    expected = AlignmentScorer(model.eval()).score(images, CAPTIONS[:4])
    scores = AlignmentScorer(loaded).score(images, CAPTIONS[:4])
    torch.testing.assert_close(scores.logit, expected.logit)
    torch.testing.assert_close(scores.probability, expected.probability)
    # the running statistics are what scores: resetting them changes the logits
    with torch.no_grad():
        loaded.adapter.text_center.zero_()
    assert not torch.allclose(AlignmentScorer(loaded).score(images, CAPTIONS[:4]).logit, expected.logit)


def test_scorer_refuses_a_model_whose_adapter_has_no_statistics(tiny_backbone):
    with pytest.raises(ValueError, match="model's feature adapter has no statistics: call model.fit_adapter"):
        AlignmentScorer(HALOCLIP(tiny_backbone, num_candidates=8))
    AlignmentScorer(HALOCLIP(tiny_backbone, num_candidates=8, normalization="sphere"))  # needs none


def test_adapter_refuses_identical_samples(tiny_backbone):
    model = HALOCLIP(tiny_backbone, num_candidates=8)
    same = torch.randn(1, tiny_backbone.embed_dim).repeat(6, 1)
    with pytest.raises(ValueError, match=r"text_features are \(nearly\) identical"):
        model.adapter.fit(torch.randn(6, tiny_backbone.embed_dim), same)
