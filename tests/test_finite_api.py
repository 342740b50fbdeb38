"""The API never returns NaN: extreme finite inputs (float32 near its range, float64 near 1e300) through the
K+1 head, search with rejection and the pair decision give finite logits and probabilities."""

import pytest
import torch

MAGNITUDES_32 = [1e-30, 1e-3, 1.0, 1e3, 1e15, 1e20, 1e30, 3e38]


def extreme_inputs(dtype, magnitudes, shape, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for magnitude in magnitudes:
        signs = torch.randint(0, 2, shape[1:], generator=g).to(dtype) * 2 - 1
        rows.append(magnitude * signs * torch.rand(shape[1:], generator=g, dtype=dtype).clamp_min(0.5))
    return torch.stack(rows)


def assert_finite(**tensors):
    for name, tensor in tensors.items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite: {tensor}"


@pytest.mark.parametrize("dtype, magnitudes", [(torch.float32, MAGNITUDES_32),
                                               (torch.float64, [1e-300, 1.0, 1e150, 1e300, 1.7e308])])
@pytest.mark.parametrize("seed", range(3))
def test_halo_head_is_finite_for_every_finite_input(dtype, magnitudes, seed):
    from halo_embed import HALOHead

    centroids = extreme_inputs(torch.float32, [1.0, 1e3, 1e-3, 3e38], (4, 6), seed + 10)
    queries = extreme_inputs(dtype, magnitudes, (len(magnitudes), 6), seed)
    out = HALOHead(centroids, 15.0, -4.0)(queries)
    assert_finite(probs=out.probs, logits=out.logits, **out.scores)
    assert torch.allclose(out.probs.sum(-1), torch.ones(len(magnitudes)), atol=1e-5)
    # ordinary inputs: the float64 path gives the float32 numbers
    ordinary = torch.randn(5, 6)
    small = HALOHead(torch.randn(4, 6), 3.0, -2.0)
    from halo_embed import geometry

    expected = torch.softmax(geometry.with_abstain(geometry.shifted_logits(ordinary, small.centroids,
                                                                          small.temperature), -2.0), -1)
    assert torch.allclose(small(ordinary).probs, expected, atol=1e-6)


def test_halo_head_refuses_non_finite_centroids():
    from halo_embed import HALOHead

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="centroids contains NaN or inf"):
            HALOHead(torch.tensor([[bad, 0.0], [1.0, 1.0]]), 1.0, 0.0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("query_norm", ["actual", "unit"])
def test_search_with_rejection_is_finite_for_large_queries(backend, query_norm):
    from halo_embed.eval import RejectionIndex

    candidates = torch.randn(7, 6)
    queries = extreme_inputs(torch.float32, MAGNITUDES_32, (len(MAGNITUDES_32), 6), 0)
    result = RejectionIndex(candidates, 12.0, -3.0, backend=backend, query_norm=query_norm).search(queries, k=3)
    assert_finite(logits=result.logits, probs=result.probs)
    if query_norm == "unit":  # far from every caption: none of these
        assert result.abstained[MAGNITUDES_32.index(1e20):].all()


def test_the_pair_decision_is_finite_for_large_embeddings():
    from halo_embed.clip.decision import PairDecision

    images = extreme_inputs(torch.float32, MAGNITUDES_32, (len(MAGNITUDES_32), 6), 1)
    texts = torch.randn(len(MAGNITUDES_32), 6)
    logit, probability, accept = PairDecision(20.0, -3.0, "fitted").judge_pairs(images, texts)
    assert_finite(logit=logit, probability=probability)
    assert not accept[MAGNITUDES_32.index(1e20):].any()
