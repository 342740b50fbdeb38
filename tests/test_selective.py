"""Selective classification: thresholds set on held-out data, risk-coverage and AURC, and HALOHead's
calibrated decision (closed-form cases and slow reference implementations)."""

import math

import numpy as np
import pytest
import torch

from halo_embed import HALOHead, geometry
from halo_embed.eval import (aurc, best_threshold, decision_rates, excess_aurc, keep_threshold, risk_coverage,
                             thresholded_decisions)


def slow_aurc(scores, correct):
    """Mean over k of the error rate among the k most confident; a tie group enters whole."""
    scores, correct = np.asarray(scores, float), np.asarray(correct, bool)
    risks = []
    for k in range(1, len(scores) + 1):
        threshold = np.sort(scores)[::-1][k - 1]
        kept = scores >= threshold  # everything tied with the k-th score enters with it
        risks.append((~correct[kept]).mean())
    return float(np.mean(risks))


def test_keep_threshold_keeps_the_share_asked_for():
    scores = np.arange(100.0)
    assert keep_threshold(scores, 0.95) == 5.0 and (scores >= 5.0).mean() == 0.95
    assert keep_threshold(scores, 1.0) == 0.0
    assert keep_threshold(scores, 0.011) == 98.0  # keeps 2 >= 1.1 of 100
    rng = np.random.default_rng(0)
    for n in (7, 50, 333):
        values = rng.normal(size=n)
        for keep in (0.5, 0.9, 0.95, 0.999):
            kept = (values >= keep_threshold(values, keep)).mean()
            assert keep <= kept < keep + 1.0 / n + 1e-12
    for bad, error in ((0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.9", TypeError)):
        with pytest.raises(error, match="keep"):
            keep_threshold(scores, bad)
    with pytest.raises(ValueError, match="id_scores"):
        keep_threshold([], 0.9)


def test_risk_coverage_and_aurc_closed_form():
    coverage, risk = risk_coverage([3.0, 2.0, 2.0, 1.0], np.array([True, False, True, False]))
    assert coverage.tolist() == [0.25, 0.75, 1.0]
    assert np.allclose(risk, [0.0, 1 / 3, 0.5])
    assert aurc([3.0, 2.0, 2.0, 1.0], np.array([True, False, True, False])) == pytest.approx(0.25 * 0 + 0.5 / 3 + 0.125)
    # a perfect ranking: errors last; a constant score: every k at the overall error rate
    correct = np.r_[np.ones(900, bool), np.zeros(100, bool)]
    perfect = aurc(-np.arange(1000.0), correct)
    assert perfect == pytest.approx(0.1 + 0.9 * math.log(0.9), abs=2e-3)
    assert aurc(np.zeros(1000), correct) == pytest.approx(0.1)
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.integers(0, 6, 40).astype(float)  # many ties
        right = rng.random(40) < 0.7
        assert aurc(scores, right) == pytest.approx(slow_aurc(scores, right))
    with pytest.raises(TypeError, match="correct must be a boolean array"):
        aurc([1.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match=r"correct must have shape \(2,\) to match"):
        aurc([1.0, 2.0], np.array([True]))
    with pytest.raises(ValueError, match="NaN"):
        aurc([1.0, float("nan")], np.array([True, True]))


def test_thresholded_decisions_use_held_out_data_only():
    rng = np.random.default_rng(2)
    held_out = {"s": rng.normal(1.0, 1.0, 400)}
    test = {"s": rng.normal(1.0, 1.0, 1000)}
    correct = rng.random(1000) < 0.8
    ood = {"far": {"s": rng.normal(-3.0, 1.0, 500)}, "near": {"s": rng.normal(0.5, 1.0, 500)}}
    result = thresholded_decisions(held_out, test, correct, ood, keep=0.9)["s"]
    assert result["threshold"] == keep_threshold(held_out["s"], 0.9)
    assert result["id_kept"] == pytest.approx(0.9, abs=0.04)
    assert result["ood_rejected"]["far"] > 0.99 > result["ood_rejected"]["near"]
    assert result["aurc"] == pytest.approx(aurc(test["s"], correct))
    held_ood = {"s": rng.normal(-3.0, 1.0, 300)}
    separated = thresholded_decisions(held_out, test, correct, ood, calibration_ood_scores=held_ood)["s"]
    assert separated["threshold"] == best_threshold(held_out["s"], held_ood["s"])[0]
    rates = decision_rates(np.array([True, False, True]), np.array([True, True, False]), {"x": np.array([False])})
    assert rates == {"id_kept": 2 / 3, "accepted_accuracy": 0.5, "overall_accuracy": 2 / 3, "ood_rejected": {"x": 1.0}}
    assert decision_rates(np.array([False]), np.array([True]), {})["accepted_accuracy"] is None


def clusters(k=5, d=8, n=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.randn(k, d, generator=generator) * 2
    centroids -= centroids.mean(0)
    labels = torch.randint(0, k, (n,), generator=generator)
    return centroids, centroids[labels] + 0.6 * torch.randn(n, d, generator=generator)


def test_calibrated_sink_keeps_the_held_out_share_and_leaves_probabilities():
    centroids, x = clusters()
    head = HALOHead(centroids, 3.0, -40.0)  # a constant the sink never beats
    before = head(x[300:])
    assert not before.abstained.any()
    calibration = head.calibrate(x[:300], keep=0.9)
    assert calibration.rule == "sink" and calibration.n_id == 300 and calibration.max_mean_sq_distance == math.inf
    assert 0.9 <= calibration.held_out_kept < 0.9 + 1 / 300 + 1e-9
    after = head(x[300:])
    assert torch.equal(after.probs, before.probs)  # the probabilities keep the loss's bias
    assert 0.8 < (~after.abstained).float().mean() < 0.97
    assert torch.equal(after.labels == -1, after.abstained)
    shifted, true = geometry.finite_shifted_and_true_logits(x[300:], head.centroids, head.temperature)
    assert torch.equal(after.abstained, geometry.classifier_abstains(shifted, true, head.temperature.double(),
                                                                      calibration.decision_bias))
    assert head.can_abstain


def test_distance_rule_catches_inputs_far_from_everything():
    """Noise of large norm is far from every prototype and from the origin: the sink lets it through, the
    distance limit does not; the held-out keep rate holds for both rules."""
    centroids, x = clusters(seed=1)
    noise = 30 * torch.randn(200, 8, generator=torch.Generator().manual_seed(5))
    sink = HALOHead(centroids, 3.0, 0.0)
    sink.calibrate(x[:300], keep=0.95)
    both = HALOHead(centroids, 3.0, 0.0)
    calibration = both.calibrate(x[:300], keep=0.95, rule="sink+distance")
    assert math.isfinite(calibration.max_mean_sq_distance)
    assert 0.95 <= calibration.held_out_kept < 0.95 + 2 / 300
    assert sink(noise).abstained.float().mean() < 0.6
    assert both(noise).abstained.all()
    assert (~both(x[300:]).abstained).float().mean() > 0.9


def test_calibration_on_held_out_ood_separates_them():
    centroids, x = clusters(seed=2)
    ood = 0.2 * torch.randn(300, 8, generator=torch.Generator().manual_seed(3))  # near the origin: the sink's
    head = HALOHead(centroids, 3.0, -40.0)
    calibration = head.calibrate(x[:300], ood_embeddings=ood[:150])
    assert calibration.n_ood == 150 and calibration.held_out_ood_rejected > 0.95
    assert head(ood[150:]).abstained.float().mean() > 0.95 and (~head(x[300:]).abstained).float().mean() > 0.95
    both = HALOHead(centroids, 3.0, -40.0)
    assert both.calibrate(x[:300], ood_embeddings=ood[:150], rule="sink+distance").held_out_ood_rejected > 0.95


def test_the_decision_travels_in_the_state_dict_and_old_heads_still_load():
    centroids, x = clusters(seed=3)
    head = HALOHead(centroids, 3.0, -2.0)
    head.calibrate(x, rule="sink+distance")
    copy = HALOHead(centroids, 3.0, -2.0)
    copy.load_state_dict(head.state_dict())
    assert copy.calibration == head.calibration
    assert torch.equal(copy(x).abstained, head(x).abstained)
    old = {k: v for k, v in head.state_dict().items() if k in ("centroids", "temperature", "abstain_bias", "class_labels")}
    legacy = HALOHead(centroids, 3.0, 5.0)
    legacy.load_state_dict(old)  # saved before the decision could be calibrated: decides with its bias
    assert legacy.calibration.rule == "reference" and legacy.decision_bias.item() == -2.0


def test_calibrate_refuses_bad_input_and_changes_nothing():
    centroids, x = clusters()
    head = HALOHead(centroids, 3.0, -2.0)
    state = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    for kwargs, error, match in (({"keep": 0.0}, ValueError, "keep"), ({"rule": "distance"}, ValueError, "rule"),
                                 ({"keep": "all"}, TypeError, "keep")):
        with pytest.raises(error, match=match):
            head.calibrate(x, **kwargs)
    with pytest.raises(ValueError, match="embeddings has D=3"):
        head.calibrate(torch.randn(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        head.calibrate(torch.full((4, 8), float("nan")))
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items() if isinstance(v, torch.Tensor))
    assert head.calibration.rule == "reference"


def test_excess_aurc_takes_the_error_rate_out():
    correct = np.r_[np.ones(80, bool), np.zeros(20, bool)]
    assert excess_aurc(-np.arange(100.0), correct) == pytest.approx(0.0)  # a perfect ranking
    assert excess_aurc(np.arange(100.0), correct) > excess_aurc(np.zeros(100), correct) > 0
    optimal = sum((k - 80) / k for k in range(81, 101)) / 100  # errors among the k most confident, k > 80
    assert excess_aurc(np.zeros(100), correct) == pytest.approx(0.2 - optimal)
