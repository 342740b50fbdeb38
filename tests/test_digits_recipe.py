from halo_embed.recipes.digits import DigitsConfig, run


def test_digits_recipe_end_to_end(tmp_path):
    """Both losses train, evaluate through halo_embed.eval and write a full report (tiny budget)."""
    metrics = run(DigitsConfig(epochs=10, hidden=64, noise_samples=50), run_dir=tmp_path)
    for name in ("cce", "halo"):
        assert 0.5 < metrics[name]["accuracy"] <= 1.0
        assert 0.0 <= metrics[name]["ece"] <= 1.0
    assert set(metrics["halo"]["ood"]) == {"not_abstain", "msp", "neg_distance", "energy"}
    assert set(metrics["cce"]["ood"]) == {"msp", "max_logit", "energy"}
    report = (tmp_path / "report.md").read_text()
    assert "| metric | CCE | HALO |" in report and "halo_pca.png" in report
    # the decision: set on held-out known digits, HALO's by the distance rule, CCE's best score thresholded
    assert "| decision (keep 95 % of held-out known digits) |" in report
    assert "| HALO decision `sink+distance` (the run's) |" in report and "| CCE `msp` thresholded |" in report
    halo = metrics["halo"]["decision"]["rules"]["sink+distance"]
    assert halo["calibration"]["held_out_kept"] >= 0.95 and halo["ood_rejected"]["uniform noise"] == 1.0
    assert metrics["headline"]["HALO"]["rejected_far"] == 1.0
    for png in ("cce_reliability.png", "halo_scores.png", "halo_pca.png"):
        assert (tmp_path / png).stat().st_size > 5000
