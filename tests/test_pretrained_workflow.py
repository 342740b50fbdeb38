"""Fine-tuning a pretrained CLIP the way its users do: zero-shot evaluation before and after, WiSE-FT,
open_clip's lock / precision / logging flags (tiny models, generated images, CPU, seconds)."""

import json

import pytest
import torch

from conftest import shape_images


@pytest.fixture(scope="module")
def zeroshot_folder(tmp_path_factory):
    """Labelled images as an image folder: discs ('circle' after the class-names file) and squares."""
    root = tmp_path_factory.mktemp("zeroshot")
    for i, image in enumerate(shape_images(24)):
        folder = root / "images" / ("c01" if i % 2 else "c02")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
    (root / "classnames.tsv").write_text("c01\ta circle\nc02\ta square\n")
    return root


def test_zeroshot_data_from_a_folder_and_from_a_csv(zeroshot_folder, tmp_path):
    from halo_embed.clip.zeroshot import load_zeroshot_data

    data = load_zeroshot_data(zeroshot_folder / "images", zeroshot_folder / "classnames.tsv")
    assert data.classnames == ["a circle", "a square"] and len(data) == 24
    assert data.labels.tolist() == [0] * 12 + [1] * 12
    assert load_zeroshot_data(zeroshot_folder / "images").classnames == ["c01", "c02"]  # folder names by default
    subset = load_zeroshot_data(zeroshot_folder / "images", limit=5, seed=3)
    assert len(subset) == 5 and subset.images == load_zeroshot_data(zeroshot_folder / "images", limit=5, seed=3).images
    table = tmp_path / "labels.csv"
    files = sorted((zeroshot_folder / "images").rglob("*.png"))
    table.write_text("filepath,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    from_csv = load_zeroshot_data(table, zeroshot_folder / "classnames.tsv")
    assert from_csv.classnames == data.classnames and from_csv.labels.tolist() == data.labels.tolist()
    names = tmp_path / "names.txt"
    names.write_text("round\nangular\n")  # one name per line, in label order
    assert load_zeroshot_data(table, names).classnames == ["round", "angular"]
    names.write_text("only one\n")
    with pytest.raises(ValueError, match="has 1 names, the data 2 classes"):
        load_zeroshot_data(table, names)
    (tmp_path / "partial.tsv").write_text("c01\tcircle\n")
    with pytest.raises(ValueError, match=r"has no name for \['c02'\]"):
        load_zeroshot_data(zeroshot_folder / "images", tmp_path / "partial.tsv")
    with pytest.raises(FileNotFoundError, match="zero-shot data not found"):
        load_zeroshot_data(tmp_path / "nope")


def test_zeroshot_accuracy_matches_a_direct_computation(tiny_model_dirs, zeroshot_folder):
    """Cosine (CLIP_benchmark's prototypes) and HALO (mean adapted prompt, nearest prototype; an image abstains
    when its nearest class's prompt fails the model's pair decision)."""
    import torch.nn.functional as F

    from halo_embed import geometry
    from halo_embed.clip import HALOCLIP, ContrastiveCLIP, load_backbone
    from halo_embed.clip.evaluate import view_of
    from halo_embed.clip.zeroshot import evaluate_zeroshot, load_zeroshot_data
    from halo_embed.data.images import load_image
    from halo_embed.eval import best_threshold, ood_metrics, threshold_accuracy

    data = load_zeroshot_data(zeroshot_folder / "images", zeroshot_folder / "classnames.tsv")
    templates = ["a photo of {}.", "a drawing of {}."]
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}").eval()
    transform = backbone.image_transform(train=False)
    pixels = torch.stack([transform(load_image(p)) for p in data.images])
    prompts = [t.format(n) for n in data.classnames for t in templates]
    with torch.no_grad():
        images, texts = backbone.encode_image(pixels), backbone.encode_text(backbone.tokenize(prompts))
    ood = {"flipped": [load_image(p).transpose(0) for p in data.images[:6]]}

    result = evaluate_zeroshot(view_of(ContrastiveCLIP(backbone, "clip")), data, templates, ood=ood)
    prototypes = F.normalize(F.normalize(texts, dim=-1).view(2, 2, -1).mean(1), dim=-1)
    expected = (F.normalize(images, dim=-1) @ prototypes.T).argmax(1) == data.labels
    assert result["rule"] == "cosine" and result["top1"] == pytest.approx(expected.float().mean().item())
    flipped_images = torch.stack([transform(image) for image in ood["flipped"]])
    with torch.no_grad():
        flipped_embeddings = backbone.encode_image(flipped_images)
    mcm = lambda e: torch.softmax(F.normalize(e, dim=-1) @ prototypes.T, dim=-1).max(dim=-1).values  # noqa: E731
    expected_auroc = ood_metrics(mcm(images).numpy(), mcm(flipped_embeddings).numpy())["auroc"]
    assert result["top5"] == 1.0 and result["ood"]["flipped"]["auroc"] == pytest.approx(expected_auroc)

    halo = HALOCLIP(backbone, num_candidates=8)
    halo.fit_adapter([(pixels, backbone.tokenize(prompts[: len(pixels)] * 6))])
    halo.eval()
    result = evaluate_zeroshot(view_of(halo), data, templates, ood=ood)
    with torch.no_grad():
        x, c = halo.adapter(images, "image"), halo.adapter(texts, "text").view(2, 2, -1).mean(1)
    temperature = halo.temperature.detach()
    shifted = geometry.shifted_logits(x, c, temperature)
    decision = halo.decision
    nearest_logit = temperature * (1 - ((x - c[shifted.argmax(1)]) ** 2).mean(-1))  # the pair rule's logit
    assert result["rule"] == "halo" and result["decision"] == decision.to_dict()
    assert result["top1"] == pytest.approx((shifted.argmax(1) == data.labels).float().mean().item())
    assert result["abstain_rate"] == pytest.approx((nearest_logit < decision.bias).float().mean().item())
    flipped = result["ood"]["flipped"]
    with torch.no_grad():
        x_flipped = halo.adapter(backbone.encode_image(flipped_images), "image")
    flipped_logit = temperature * (1 - ((x_flipped - c[geometry.shifted_logits(x_flipped, c, temperature).argmax(1)])
                                        ** 2).mean(-1))
    abstained, flipped_abstained = nearest_logit < decision.bias, flipped_logit < decision.bias
    assert flipped["abstain_rate"] == pytest.approx(flipped_abstained.float().mean().item())
    assert flipped["builtin_decision_accuracy"] == pytest.approx(
        0.5 * ((~abstained[1::2]).float().mean().item() + flipped_abstained[1::2].float().mean().item()))
    p_aligned = lambda e: decision.judge_pairs(e, c[geometry.shifted_logits(e, c, temperature).argmax(1)])[1]  # noqa: E731
    known, unknown = p_aligned(x), p_aligned(x_flipped)
    threshold, _ = best_threshold(known[0::2].numpy(), unknown[0::2].numpy())
    assert flipped["tuned_threshold_accuracy"] == pytest.approx(
        threshold_accuracy(known[1::2].numpy(), unknown[1::2].numpy(), threshold))


def test_wise_ft_interpolates_weights_and_the_effective_temperature(tiny_model_dirs):
    from halo_embed.clip import HALOCLIP, ContrastiveCLIP, load_backbone
    from halo_embed.clip.interpolation import interpolate_weights

    def halo(seed):
        torch.manual_seed(seed)
        backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
        for p in backbone.parameters():  # a different "fine-tuned" point
            p.data.add_(torch.randn_like(p) * 0.1 * seed)
        model = HALOCLIP(backbone, num_candidates=8)
        model.loss.gamma.data.fill_(1.0 + 5 * seed)
        return model

    start, end = halo(0), halo(1)
    for alpha in (0.0, 0.3, 1.0):
        mixed = interpolate_weights(start, end, alpha)
        for key, value in mixed.state_dict().items():
            if key == "loss.gamma":
                continue
            expected = (1 - alpha) * start.state_dict()[key].float() + alpha * end.state_dict()[key].float()
            assert torch.allclose(value.float(), expected, atol=1e-6), key
        t0, t1 = float(start.temperature.detach()), float(end.temperature.detach())
        assert float(mixed.temperature.detach()) == pytest.approx((1 - alpha) * t0 + alpha * t1, rel=1e-5)
    assert interpolate_weights(start, end, 0.5) is not end  # a new model; the inputs are untouched
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate_weights(start, end, 1.5)
    with pytest.raises(TypeError, match="same kind of model"):
        interpolate_weights(start, ContrastiveCLIP(end.backbone, "clip"), 0.5)
    other = HALOCLIP(end.backbone, num_candidates=16)
    with pytest.raises(ValueError, match="differ in architecture"):
        interpolate_weights(start, other, 0.5)


def run_finetune(tmp_path, model_dir, zeroshot_folder, loss, *extra):
    from halo_embed.cli import main

    args = ["finetune", "--model", f"local-dir:{model_dir}", "--loss", loss, "--shapes-train-images", "48",
            "--shapes-val-images", "24", "--batch-size", "16", "--max-steps", "3", "--eval-images", "24",
            "--warmup", "1", "--adapter-samples", "32", "--logs", str(tmp_path), "--name", loss, "--no-progress",
            "--zeroshot-data", str(zeroshot_folder / "images"), "--zeroshot-classnames",
            str(zeroshot_folder / "classnames.tsv"), *extra]
    assert main(args) == 0
    return tmp_path / loss


@pytest.mark.parametrize("loss", ["halo", "clip"])
def test_finetune_measures_zeroshot_before_and_after_and_sweeps_wise_ft(tmp_path, tiny_model_dirs, zeroshot_folder,
                                                                        loss):
    from halo_embed.cli import main
    from halo_embed.clip import AlignmentScorer, load_checkpoint, load_model

    run = run_finetune(tmp_path, tiny_model_dirs["open_clip_local_dir"], zeroshot_folder, loss,
                       "--wise-ft", "1", "0", "0.5")
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["zeroshot"]["before"], metrics["zeroshot"]["after"]
    assert before["classes"] == 2 and before["images"] == 24 and before["rule"] == ("halo" if loss == "halo" else "cosine")
    points = {p["alpha"]: p for p in metrics["wise_ft"]["alphas"]}
    assert sorted(points) == [0.0, 0.5, 1.0]
    # the sweep's end points are the models the run measured: alpha 0 before the first step, alpha 1 at the end
    assert points[0.0]["zeroshot"]["top1"] == before["top1"] and points[1.0]["zeroshot"] == after
    assert points[1.0]["retrieval"] == metrics["eval"]["val"]["retrieval"]
    final, initial = load_model(run / "final"), load_model(run / "initial")
    alpha_one = load_model(run / "wise_ft" / "alpha-1.00")
    for key, value in final.state_dict().items():
        assert torch.equal(value, alpha_one.state_dict()[key]), key
    assert not all(torch.equal(v, initial.state_dict()[k]) for k, v in final.state_dict().items())
    report = (run / "report.md").read_text()
    assert "Zero-shot classification" in report and "WiSE-FT" in report and (run / "wise_ft" / "wise_ft.png").exists()
    if loss == "halo":
        from halo_embed.clip.interpolation import interpolate_weights

        # the saved alpha-0.50 scorer is the interpolation of the run's two ends, with that alpha's own decision
        scorer = AlignmentScorer.from_checkpoint(str(run / "wise_ft" / "alpha-0.50"))
        middle = interpolate_weights(initial, final, 0.5).eval()
        middle.fitted_decision = scorer.model.fitted_decision
        images, captions = shape_images(4), ["a red circle", "a blue square", "a green cross", "a red circle"]
        assert torch.equal(scorer.score(images, captions).probability,
                           AlignmentScorer(middle).score(images, captions).probability)
    else:
        with pytest.raises(ValueError, match="not a HALO checkpoint"):
            load_checkpoint(run / "final")
    # the command on the finished run writes a new folder, never over the first sweep
    assert main(["wise-ft", str(run), "--alphas", "0.25"]) == 0
    assert (run / "wise_ft-2" / "alpha-0.25" / "model.safetensors").exists()
    assert json.loads((run / "wise_ft" / "wise_ft.json").read_text())["alphas"][0]["alpha"] == 0.0


def test_wise_ft_reads_a_run_of_the_older_layout(tmp_path, tiny_model_dirs, zeroshot_folder):
    """Runs written before 2026-12-07 named final/ and initial/ checkpoint/ and checkpoint-initial/."""
    from halo_embed.cli import main

    run = run_finetune(tmp_path, tiny_model_dirs["open_clip_local_dir"], zeroshot_folder, "halo", "--wise-ft", "1")
    (run / "final").rename(run / "checkpoint")
    (run / "initial").rename(run / "checkpoint-initial")
    assert main(["wise-ft", str(run), "--alphas", "0.5"]) == 0
    assert (run / "wise_ft-2" / "alpha-0.50" / "model.safetensors").exists()


def test_wise_ft_command_errors_are_one_line(tmp_path, tiny_model_dirs, zeroshot_folder, capsys):
    from halo_embed.cli import main

    run = run_finetune(tmp_path, tiny_model_dirs["open_clip_local_dir"], zeroshot_folder, "halo")
    capsys.readouterr()
    for args, message in (([str(run), "--alphas", "1.5"], "alphas must be in [0, 1]"),
                          ([str(run)], "initial is missing (start the run with --wise-ft"),
                          ([str(tmp_path / "nope")], "is not a halo-embed finetune run folder")):
        assert main(["wise-ft", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    # a run started without --wise-ft cannot sweep on resume: said before any step, not after training
    with pytest.raises(AssertionError):
        run_finetune(tmp_path, tiny_model_dirs["open_clip_local_dir"], zeroshot_folder, "halo", "--resume", "latest",
                     "--wise-ft", "0.5")
    assert "has no initial/ (the run was started without --wise-ft)" in capsys.readouterr().err


def test_open_clip_flags_are_validated_in_one_line(tmp_path, capsys, zeroshot_folder):
    from halo_embed.cli import main

    cases = (
        (["--lock-image-unlocked-groups", "2"], "--lock-image-unlocked-groups applies to a locked tower: add --lock-image"),
        (["--lock-text", "--lock-text-unlocked-layers", "-1"], "--lock-text-unlocked-layers must be >= 0, got -1"),
        (["--wise-ft", "0.5", "2"], "--wise-ft alphas must be in [0, 1], got 2.0"),
        (["--siglip", "--loss", "halo"], "--siglip means --loss siglip"),
        (["--log-every-n-steps", "0"], "--log-every-n-steps must be >= 1, got 0"),
        (["--save-frequency", "-2"], "--save-frequency must be >= 0, got -2"),
        (["--zeroshot-data", str(tmp_path / "nope")], "--zeroshot-data"),
        (["--zeroshot-data", str(zeroshot_folder / "images"), "--zeroshot-templates", "no placeholder"],
         "--zeroshot-templates: templates must contain '{}'"),
    )
    if not torch.cuda.is_available():
        cases += ((["--precision", "pure_fp16"], "--precision pure_fp16 (float16) needs a CUDA GPU"),)
    for args, message in cases:
        assert main(["finetune", *args, "--logs", str(tmp_path / "runs")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (args, err)
        assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):  # argparse: not one of open_clip's values
        main(["finetune", "--precision", "fp64"])
    with pytest.raises(SystemExit):
        main(["finetune", "--report-to", "mlflow"])


def test_siglip_flag_means_the_siglip_loss(tmp_path):
    import argparse

    from halo_embed.recipes.finetune_config import add_arguments, configs_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configs = configs_from_args(parser.parse_args(["--siglip", "--logs", str(tmp_path)]))
    assert [c.loss for c in configs] == ["siglip"]
    log_alias = configs_from_args(parser.parse_args(["--log-every", "7", "--logs", str(tmp_path)]))
    assert log_alias[0].log_every == 7


def trainable(module):
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_open_clip_lock_flags_leave_the_last_groups_trainable(tiny_model_dirs):
    from halo_embed.clip import load_backbone

    def fresh():
        return load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")

    backbone = fresh()
    backbone.lock_image()
    assert not any(n.startswith("model.visual.") for n in trainable(backbone))
    backbone = fresh()
    backbone.lock_image(unlocked_groups=1)  # open_clip's last group: the projection
    assert {n for n in trainable(backbone) if n.startswith("model.visual.")} == {"model.visual.proj"}
    backbone = fresh()
    backbone.lock_image(unlocked_groups=2)
    visual = {n for n in trainable(backbone) if n.startswith("model.visual.")}
    assert "model.visual.ln_post.weight" in visual and "model.visual.conv1.weight" not in visual
    backbone = fresh()
    backbone.lock_text(unlocked_layers=1, freeze_layer_norm=False)  # open_clip's own tower: LN follows its layer
    assert {n for n in trainable(backbone) if not n.startswith("model.visual.")} >= {"model.text_projection"}
    assert "model.ln_final.weight" not in trainable(backbone)
    with pytest.raises(ValueError, match="unlocked_groups must be >= 0"):
        fresh().lock_image(unlocked_groups=-1)


def test_transformers_lock_flags_follow_open_clips_groups(tiny_model_dirs):
    from halo_embed.clip import load_backbone

    def fresh():
        return load_backbone("transformers", str(tiny_model_dirs["hf"]))

    backbone = fresh()
    backbone.lock_image(unlocked_groups=1)
    assert {n for n in trainable(backbone) if "vision" in n or "visual" in n} == {"model.visual_projection.weight"}
    backbone = fresh()
    backbone.lock_image(unlocked_groups=2)
    vision = {n for n in trainable(backbone) if "vision" in n or "visual" in n}
    layers = len(backbone.model.vision_model.encoder.layers)
    assert any(f"encoder.layers.{layers - 1}." in n for n in vision) and "model.vision_model.post_layernorm.weight" in vision
    assert not any(f"encoder.layers.{layers - 2}." in n for n in vision)
    backbone = fresh()
    backbone.lock_text(unlocked_layers=0, freeze_layer_norm=False)  # LayerNorms of locked layers still train
    text = {n for n in trainable(backbone) if "text" in n}
    assert text and all("layer_norm" in n for n in text)
    backbone = fresh()
    backbone.lock_text()
    assert not {n for n in trainable(backbone) if "text" in n}


def test_half_precision_weights_as_open_clip_defines_them(tiny_model_dirs):
    from halo_embed.clip import load_backbone

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", precision="bf16")
    dtypes = {name: p.dtype for name, p in backbone.named_parameters()}
    assert dtypes["model.visual.conv1.weight"] == torch.bfloat16 and dtypes["model.ln_final.weight"] == torch.float32
    pixels = torch.randn(2, 3, *backbone.model.visual.image_size)  # fp32 pixels are cast like open_clip's input
    assert backbone.encode_image(pixels).shape[0] == 2
    pure = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", precision="pure_bf16")
    assert {p.dtype for p in pure.parameters()} == {torch.bfloat16}
    amp = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", precision="amp_bf16")
    assert {p.dtype for p in amp.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="precision must be one of"):
        load_backbone("open_clip", "x", precision="half")


def test_save_frequency_and_report_to(tmp_path, tiny_model_dirs):
    from halo_embed.recipes.clip_finetune import FinetuneConfig, train

    config = FinetuneConfig(model=f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", shapes_train_images=48,
                            shapes_val_images=24, batch_size=16, epochs=2, save_every=1000, save_frequency=1,
                            eval_images=24, warmup=1, adapter_samples=32, logs=str(tmp_path), name="run",
                            progress=False, report_to="none", keep_checkpoints=5)
    steps = train(config)["steps"]
    run = tmp_path / "run"
    # a checkpoint at the end of each epoch, none from --save-every
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", f"step-{steps // 2:07d}",
                                                                       f"step-{steps:07d}"]
    assert not (run / "tensorboard").exists()


def test_clip_baseline_follows_open_clip_trainer(tiny_model_dirs, tmp_path, capsys):
    """Parity details with open_clip_train: the temperature of a scale at 100 still learns (clamped after the
    step, not in the forward pass), its weight-decay rule, and --grad-clip-norm none."""
    import argparse
    import math

    from halo_embed.cli import main
    from halo_embed.clip import ContrastiveCLIP, load_backbone, parameter_groups
    from halo_embed.recipes.finetune_config import add_arguments, configs_from_args

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    model = ContrastiveCLIP(backbone, "clip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # where pretrained OpenAI CLIP ends
    images = torch.randn(4, 3, *backbone.model.visual.image_size)
    model(images, backbone.tokenize(["a", "b", "c", "d"])).backward()
    assert float(model.logit_scale.grad.abs()) > 0
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))

    decay, no_decay = (set(map(id, g["params"])) for g in parameter_groups(model, 0.1))
    named = dict(model.named_parameters())
    assert id(named["backbone.model.positional_embedding"]) in decay  # 2-D: decayed, as open_clip does
    assert id(named["backbone.model.ln_final.weight"]) in no_decay and id(named["backbone.model.logit_scale"]) in no_decay

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert configs_from_args(parser.parse_args(["--grad-clip-norm", "none", "--logs", str(tmp_path)]))[0].grad_clip_norm is None
    assert main(["finetune", "--grad-clip-norm", "-1", "--logs", str(tmp_path / "runs")]) == 2
    assert "--grad-clip-norm must be >= 0 or none, got -1.0" in capsys.readouterr().err


def test_small_data_preset_fills_what_was_not_given(tmp_path):
    import argparse

    from halo_embed.recipes.finetune_config import PRESETS, add_arguments, configs_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (config,) = configs_from_args(parser.parse_args(["--preset", "small-data", "--logs", str(tmp_path)]))
    for key, value in PRESETS["small-data"].items():
        assert getattr(config, key) == value, key
    (config,) = configs_from_args(parser.parse_args(["--preset", "small-data", "--lr=2e-5", "--epochs", "9",
                                                     "--logs", str(tmp_path)]))
    assert (config.lr, config.epochs) == (2e-5, 9)  # given explicitly: kept
    (config,) = configs_from_args(parser.parse_args(["--logs", str(tmp_path)]))
    assert config.lr == 5e-4 and config.preset is None


def test_distinct_alphas_never_share_a_folder():
    from halo_embed.recipes.wise_ft import alpha_folder

    assert alpha_folder(0.5) == "alpha-0.50" and alpha_folder(0.0) == "alpha-0.00" and alpha_folder(1.0) == "alpha-1.00"
    alphas = [0.001, 0.004, 0.0, 0.25, 0.1234561, 0.1234562, 1e-9, 0.33333333333333331, 1 / 3 + 1e-16]
    names = [alpha_folder(a) for a in sorted(set(alphas))]
    assert len(names) == len(set(names)), names


def test_wise_ft_waits_for_nobody(tmp_path, capsys):
    """wise-ft on a run folder another process holds (the run still training, or a second sweep) stops at once."""
    from halo_embed.cli import main
    from halo_embed.io import claim_for

    run = tmp_path / "run"
    with claim_for(run, "the test"):
        assert main(["wise-ft", str(run), "--alphas", "0.5"]) == 2
    assert "is in use by pid" in capsys.readouterr().err and not run.exists()
