import pytest
import torch

from halo_embed import ABSTAIN, HALOHead, HALOLoss, HALOModel, geometry


def make_head(k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cen = torch.randn(k, d, generator=g)
    cen = cen - cen.mean(0)
    loss = HALOLoss(d, k)
    return HALOHead(cen, loss.temperature, loss.abstain_bias), cen


def test_probabilities_and_decisions():
    head, cen = make_head()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([cen + 0.05 * torch.randn(cen.shape, generator=g), torch.zeros(1, 8)])
    out = head(x)
    assert out.probs.shape == (5, 5)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(5))
    # on (or very near) its centroid an input is that class; at the origin it abstains
    assert out.labels[:4].tolist() == [0, 1, 2, 3]
    assert out.labels[4].item() == ABSTAIN and out.abstained[4]
    assert torch.equal(out.abstained, out.probs.argmax(1) == 4)


def test_scores_against_direct_formulas():
    head, cen = make_head()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    out = head(x)
    torch.testing.assert_close(out.scores["not_abstain"], 1 - out.probs[:, -1])
    torch.testing.assert_close(out.scores["msp"], out.probs[:, :4].max(1).values)
    nearest_sq = (torch.cdist(x, cen) ** 2 / 8).min(1).values
    torch.testing.assert_close(out.scores["neg_distance"], -nearest_sq, rtol=1e-4, atol=1e-4)
    true = -head.temperature * torch.cdist(x, cen) ** 2 / 8
    torch.testing.assert_close(out.scores["energy"], torch.logsumexp(true, 1), rtol=1e-4, atol=1e-4)


def test_logits_match_the_loss_geometry():
    head, cen = make_head()
    x = torch.randn(6, 8)
    shifted = geometry.shifted_logits(x, cen, head.temperature)
    torch.testing.assert_close(head.logits(x), geometry.with_abstain(shifted, head.abstain_bias.item()))


def test_from_trained_and_class_labels():
    torch.manual_seed(0)
    model = HALOModel(torch.nn.Linear(3, 8), 4, 8)
    loss = HALOLoss(8, 4)
    head = HALOHead.from_trained(model, loss)
    torch.testing.assert_close(head.centroids, model.centered_centroids().detach())
    relabelled = HALOHead(head.centroids, head.temperature, head.abstain_bias, torch.tensor([5, 6, 7, 8]))
    out = relabelled(head.centroids)
    assert out.labels.tolist() == [5, 6, 7, 8]
    assert set(head.state_dict()) == {"centroids", "temperature", "abstain_bias", "class_labels", "decision_bias",
                                      "max_mean_sq_distance", "_extra_state"}
    with pytest.raises(ValueError, match=r"model has \(K, D\) = \(4, 8\) but loss has \(3, 8\)"):
        HALOHead.from_trained(model, HALOLoss(8, 3))
    with pytest.raises(TypeError, match="model must be a HALOModel"):
        HALOHead.from_trained(torch.nn.Linear(2, 2), loss)


def test_validation():
    head, _ = make_head()
    with pytest.raises(ValueError, match="embeddings has D=7 dimensions, the head expects 8"):
        head(torch.randn(2, 7))
    with pytest.raises(ValueError, match="NaN or inf"):
        head(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match="temperature must be the effective"):
        HALOHead(torch.randn(3, 4), 0.0, 1.0)
