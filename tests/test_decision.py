"""The accept / reject decision fitted on held-out pairs: the fit itself, the trainer's calibration split, the
scorer and evaluation using the one rule, and ``halo-embed calibrate`` on a model that was never trained."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import shape_images


def logistic_pairs(temperature, bias, n, seed=0):
    """Mean-square distances of pairs whose label follows HALO's pair rule exactly (a known answer)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1  # 1 - |x - t|^2 / D
    aligned = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(temperature * z - bias)
    return 1 - z[aligned], 1 - z[~aligned]


def test_the_fit_recovers_a_known_rule():
    from halo_embed.clip.decision import fit_pair_decision

    aligned, mismatched = logistic_pairs(12.0, 3.0, 40_000)
    decision = fit_pair_decision(aligned, mismatched)
    # classes are weighted equally: the fitted log-odds gain log(n_mismatched / n_aligned), the bias loses it
    shift = math.log(len(mismatched) / len(aligned))
    assert decision.temperature == pytest.approx(12.0, rel=0.05)
    assert decision.bias == pytest.approx(3.0 - shift, abs=0.15)
    assert decision.rule == "fitted" and decision.fitted_on["aligned"] == len(aligned)
    # the bias alone at a given temperature: the weighted cross-entropy's derivative vanishes there
    only_bias = fit_pair_decision(aligned, mismatched, temperature=12.0)
    assert only_bias.temperature == 12.0 and only_bias.bias == pytest.approx(decision.bias, abs=0.2)
    z = torch.cat([1 - aligned, 1 - mismatched])
    y = torch.cat([torch.ones_like(aligned), torch.zeros_like(mismatched)])
    w = torch.cat([torch.full_like(aligned, 0.5 / len(aligned)), torch.full_like(mismatched, 0.5 / len(mismatched))])
    assert abs(float((w * (y - torch.sigmoid(12.0 * z - only_bias.bias))).sum())) < 1e-9


def test_one_rule_judges_every_pair():
    from halo_embed import geometry
    from halo_embed.clip.decision import PairDecision

    decision = PairDecision(10.0, 2.0, "fitted")
    msd = torch.tensor([0.0, 0.75, 1.0, 2.0])
    logit, p, accept = decision.judge(msd)
    assert torch.allclose(logit, 10.0 * (1 - msd)) and torch.allclose(p, torch.sigmoid(logit - 2.0))
    assert accept.tolist() == [True, True, False, False] and (accept == (p >= 0.5)).all()
    assert geometry.pair_decision(torch.tensor(0.75), 10.0, 2.5)[2]  # a tie accepts
    assert PairDecision.from_dict(decision.to_dict()) == decision
    # the pair's accept is the K = 1 case of the classifier's sink rule (one comparison with the bias)
    logits = torch.tensor([[1.0], [2.0], [3.0]])
    assert (geometry.pair_accepts(logits[:, 0], 2.0) == ~geometry.abstain_mask(logits, 2.0)).all()
    assert geometry.pair_probability(torch.tensor([float("inf"), -float("inf")]), 1.0).tolist() == [1.0, 0.0]


def test_fit_refuses_what_it_cannot_fit():
    from halo_embed.clip.decision import fit_pair_decision

    aligned, mismatched = logistic_pairs(12.0, 3.0, 2000)
    with pytest.raises(ValueError, match="aligned has 10 pairs; a stable fit needs at least 50"):
        fit_pair_decision(aligned[:10], mismatched)
    with pytest.raises(ValueError, match="do not separate"):
        fit_pair_decision(mismatched, aligned)  # aligned pairs farther apart than mismatched ones
    with pytest.raises(ValueError, match="NaN"):
        fit_pair_decision(torch.cat([aligned, torch.tensor([float("nan")], dtype=aligned.dtype)]), mismatched)


def test_the_scorer_and_the_evaluation_use_the_fitted_decision(tmp_path, tiny_backbone):
    from halo_embed.clip import AlignmentScorer, HALOCLIP, load_checkpoint, save_checkpoint
    from halo_embed.clip.decision import PairDecision

    model = HALOCLIP(tiny_backbone, num_candidates=8, normalization="sphere")
    assert model.decision.rule == "constant" and model.decision.bias == model.abstain_bias
    model.fitted_decision = PairDecision(7.5, 1.25, "fitted", {"aligned": 60, "mismatched": 60})
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.decision == model.decision
    scorer = AlignmentScorer(loaded)
    images, texts = shape_images(3), ["a red circle", "a blue square", "a green cross"]
    scores = scorer.score(images, texts)
    expected = 7.5 * (1 - ((scorer.encode_images(images) - scorer.encode_texts(texts)) ** 2).mean(-1))
    assert torch.allclose(scores.logit, expected, atol=1e-5) and scores.abstain_bias == 1.25
    assert torch.equal(scores.accept, scores.logit >= 1.25)
    ranking = scorer.rank(images, texts, k=2, backend="torch").result
    assert torch.equal(ranking.abstained, ~(ranking.logits[:, 0] >= 1.25))


def calibration_csv(directory, images=60, seed=0):
    """``images`` generated images with two captions each, as a pairs CSV."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i, image in enumerate(shape_images(images, seed=seed)):
        path = directory / f"{i:03d}.png"
        image.save(path)
        shape = "circle" if i % 2 else "square"
        rows += [f"{path},a {shape} number {i}", f"{path},a picture of a {shape}"]
    (directory / "pairs.csv").write_text("\n".join(rows) + "\n")
    return directory / "pairs.csv"


def test_calibrate_then_score_an_untrained_model(tmp_path, tiny_model_dirs, capsys):
    from halo_embed.cli import main
    from halo_embed.clip import load_checkpoint

    pairs = calibration_csv(tmp_path / "pairs")
    out = tmp_path / "scorer"
    code = main(["calibrate", "--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", "--pairs", str(pairs),
                 "--output", str(out), "--keep-temperature"])
    printed = capsys.readouterr().out
    assert code == 0 and "calibrated pretrained open_clip model" in printed and "accepts a pair at cosine >=" in printed
    model = load_checkpoint(out)
    decision = json.loads((out / "calibration.json").read_text())["decision"]
    assert model.decision.rule == "fitted" and model.decision.bias == pytest.approx(decision["bias"])
    assert model.adapter.normalization == "sphere"
    assert model.decision.temperature == pytest.approx(0.5 * float(model.backbone.model.logit_scale.exp()), rel=1e-5)
    assert main(["score", "--checkpoint", str(out), "--pairs", str(pairs), "--output", str(tmp_path / "s.csv"),
                 "--workers", "0"]) == 0
    # the same again into the same folder: refused before any model is loaded
    assert main(["calibrate", "--model", "x", "--pairs", str(pairs), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("few", "leaves 30 image(s) to calibrate the decision on; a stable fit needs at least 50"),
    ("both", "one of them"),
    ("not_dual", "is not a halo-embed checkpoint"),
    ("pretrained_with_checkpoint", "--pretrained builds a model from --model"),
])
def test_calibrate_input_errors_are_one_line(tmp_path, tiny_model_dirs, capsys, case, message):
    from halo_embed.cli import main

    pairs = calibration_csv(tmp_path / "pairs", images=30 if case == "few" else 60)
    model = ["--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"]
    not_dual = tmp_path / "cifar-run"
    not_dual.mkdir()
    (not_dual / "config.json").write_text(json.dumps({"format": "something-else"}))
    extra = {"few": model, "both": [*model, "--checkpoint", str(tmp_path)], "not_dual": ["--checkpoint", str(not_dual)],
             "pretrained_with_checkpoint": ["--checkpoint", str(not_dual), "--pretrained", "openai"]}[case]
    assert main(["calibrate", *extra, "--pairs", str(pairs), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_finetune_calibration_split_fits_the_decision_on_held_out_images(tmp_path, tiny_model_dirs):
    from halo_embed.clip import load_checkpoint
    from halo_embed.recipes.clip_finetune import FinetuneConfig, train
    from halo_embed.recipes.finetune_data import load_pairs, split_calibration

    config = FinetuneConfig(model=f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", train_data="shapes",
                            shapes_train_images=120, shapes_val_images=24, eval_images=24, batch_size=16, max_steps=3,
                            warmup=1, lr=1e-3, logs=str(tmp_path), name="run", progress=False, report_to="none",
                            normalization="sphere", calibration_split=0.5, wise_ft=[0.5])
    train_part, held_out = split_calibration(config, load_pairs(config, "train"))
    train_images = {train_part.image_key(i) for i in range(len(train_part))}
    held_images = {held_out.image_key(i) for i in range(len(held_out))}
    assert len(held_images) == 60 and not train_images & held_images and len(train_images) == 60
    metrics = train(config)
    decision = metrics["decision"]
    assert decision["rule"] == "fitted" and decision["fitted_on"]["aligned"] == 60
    assert load_checkpoint(tmp_path / "run" / "final").decision.to_dict() == decision
    assert load_checkpoint(tmp_path / "run" / "initial").decision.rule == "fitted"
    assert load_checkpoint(tmp_path / "run" / "wise_ft" / "alpha-0.50").decision.rule == "fitted"
    pooled = metrics["eval"]["val"]["rejection"]["all mismatched"]
    for key in ("builtin_threshold_accuracy", "calibration_threshold_accuracy", "platt_accuracy", "builtin_ece",
                "platt_ece", "builtin_brier"):
        assert 0 <= pooled[key] <= 1 and not np.isnan(pooled[key]), key
    assert "Decision: fitted on 60 aligned" in (tmp_path / "run" / "report.md").read_text()


def test_finetune_calibration_split_errors_before_training(tmp_path, tiny_model_dirs, capsys):
    from halo_embed.cli import main

    base = ["finetune", "--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", "--shapes-train-images", "60",
            "--batch-size", "8", "--max-steps", "1", "--logs", str(tmp_path), "--no-progress", "--report-to", "none"]
    assert main([*base, "--calibration-split", "0.5", "--name", "few"]) == 2
    assert "leaves 30 image(s) to calibrate the decision on" in capsys.readouterr().err
    assert main([*base, "--calibration-split", "1.5", "--name", "big"]) == 2
    assert "--calibration-split must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "few").exists() and not (tmp_path / "big").exists()
