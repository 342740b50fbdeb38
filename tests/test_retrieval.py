import sys

import pytest
import torch

from halo_embed import HALOHead, geometry
from halo_embed.eval import RejectionIndex, VectorIndex, retrieval_recall


def separated(n, d, seed):
    """Random points whose pairwise distances have no near-ties (so rankings are unambiguous)."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_and_torch_exact_agree(metric):
    gallery, queries = separated(500, 32, 0), separated(200, 32, 1)
    a = VectorIndex(gallery, metric, "faiss").search(queries, 10)
    b = VectorIndex(gallery, metric, "torch").search(queries, 10)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    # and both against a plain reference
    if metric == "l2":
        ref = torch.cdist(queries, gallery).topk(10, largest=False).indices
    else:
        qn, gn = torch.nn.functional.normalize(queries, dim=1), torch.nn.functional.normalize(gallery, dim=1)
        ref = (qn @ gn.T).topk(10).indices
    assert torch.equal(a.indices, ref)


def slow_recall(images, texts, ids, k, metric):
    if metric == "l2":
        sim = -torch.cdist(images, texts)
    else:
        sim = torch.nn.functional.normalize(images, dim=1) @ torch.nn.functional.normalize(texts, dim=1).T
    i2t = sum(any(ids[j] == i for j in sim[i].topk(k).indices.tolist()) for i in range(len(images)))
    t2i = sum(ids[j] in sim[:, j].topk(k).indices.tolist() for j in range(len(texts)))
    return i2t / len(images), t2i / len(texts)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_recall_against_slow_reference_and_backends(metric):
    images = separated(60, 16, 2)
    ids = torch.arange(60).repeat_interleave(5)  # 5 captions per image, Flickr style
    texts = images[ids] + 1.2 * separated(300, 16, 3)
    faiss_r = retrieval_recall(images, texts, ids, metric=metric, backend="faiss")
    torch_r = retrieval_recall(images, texts, ids, metric=metric, backend="torch")
    assert faiss_r == torch_r
    for k in (1, 5, 10):
        i2t, t2i = slow_recall(images, texts, ids, k, metric)
        assert faiss_r[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert faiss_r[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < faiss_r["image_to_text_R@1"] < 1  # the case is neither trivial nor hopeless


def test_recall_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # captions 0 and 1 describe image 0, caption 2 image 1 (but it lies next to image 2), caption 3 image 2
    texts = torch.tensor([[0.9, 0.0], [1.2, 0.0], [-0.8, -0.1], [-1.0, -0.2]])
    ids = torch.tensor([0, 0, 1, 2])
    for backend in ("faiss", "torch"):
        r = retrieval_recall(images, texts, ids, ks=(1, 2), backend=backend)
        # squared distances from image 1 = (0, 1): c0 1.81, c1 2.44, c2 1.85, c3 2.44 -> c0 first (miss), c2 second
        assert r["image_to_text_R@1"] == 2 / 3 and r["image_to_text_R@2"] == 1.0
        # caption 2: image 2 at 0.05, image 1 at 1.85 -> miss at 1, hit at 2
        assert r["text_to_image_R@1"] == 3 / 4 and r["text_to_image_R@2"] == 1.0


def test_approximate_index_reports_overlap_with_exact():
    images = separated(400, 16, 4)
    ids = torch.arange(400)
    texts = images + 0.5 * separated(400, 16, 5)
    exact = retrieval_recall(images, texts, ids)
    hnsw = retrieval_recall(images, texts, ids, kind="hnsw")
    assert hnsw["image_to_text_exact_overlap@10"] >= 0.9
    assert abs(hnsw["image_to_text_R@10"] - exact["image_to_text_R@10"]) < 0.05
    # IVF visiting 2 of 8 cells is approximate (overlap 0.65 measured): the overlap reports it, and visiting
    # every cell is exact again
    ivf = retrieval_recall(images, texts, ids, kind="ivf", nlist=8, nprobe=2)
    assert 0.4 < ivf["image_to_text_exact_overlap@10"] < 0.9
    assert ivf["image_to_text_R@10"] <= exact["image_to_text_R@10"]
    every_cell = retrieval_recall(images, texts, ids, kind="ivf", nlist=8, nprobe=8)
    assert every_cell["image_to_text_exact_overlap@10"] == 1.0


def test_retrieval_validation(monkeypatch):
    images, texts = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption"):
        retrieval_recall(images, texts, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"text_image_ids must be in \[0, 3\)"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="image_embeddings has D=4 but text_embeddings has D=5"):
        retrieval_recall(images, torch.randn(4, 5), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="metric must be one of"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2, 2]), metric="dot")
    with pytest.raises(ValueError, match="needs backend='faiss'"):
        VectorIndex(images, backend="torch", kind="hnsw")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(ImportError, match=r"`pip install faiss-gpu` on Linux x86-64"):
        VectorIndex(images)
    VectorIndex(images, backend="torch")  # the fallback needs no faiss


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_rejection_index_matches_the_halo_head(backend):
    g = torch.Generator().manual_seed(6)
    centroids = torch.randn(12, 16, generator=g)
    centroids -= centroids.mean(0)
    head = HALOHead(centroids, 3.0, 0.5)
    queries = torch.cat([centroids[:5] + 0.1 * torch.randn(5, 16, generator=g), 0.05 * torch.randn(5, 16, generator=g)])
    found = RejectionIndex(centroids, 3.0, 0.5, backend=backend).search(queries, k=12)
    expected = head(queries)
    # full k: the probabilities are the head's K+1 softmax, reordered by rank
    reordered = torch.gather(expected.probs[:, :-1], 1, found.indices)
    torch.testing.assert_close(found.probs[:, :-1], reordered, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found.abstain_prob, expected.probs[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(found.abstained, expected.abstained)
    assert found.abstained[5:].all() and not found.abstained[:5].any()
    shifted = geometry.shifted_logits(queries, centroids, torch.tensor([3.0]))
    torch.testing.assert_close(found.logits, torch.gather(shifted, 1, found.indices), rtol=1e-4, atol=1e-4)
    top2 = RejectionIndex(centroids, 3.0, 0.5, backend=backend).search(queries, k=2)
    assert top2.probs.shape == (10, 3) and torch.equal(top2.indices, found.indices[:, :2])
    assert torch.equal(top2.abstained, found.abstained)


def test_recall_with_shared_image_ids():
    """Class-name captions: many images share one caption; a hit is a caption of the image's class."""
    g = torch.Generator().manual_seed(7)
    class_captions = torch.randn(4, 8, generator=g) * 3
    labels = torch.arange(4).repeat(10)
    images = class_captions[labels] + torch.randn(40, 8, generator=g)
    labels[0] = (labels[0] + 1) % 4  # one image labelled with the wrong class: a miss
    r = retrieval_recall(images, class_captions, torch.arange(4), ks=(1,), image_ids=labels)
    nearest = torch.cdist(images, class_captions).argmin(1)
    assert r["image_to_text_R@1"] == pytest.approx((nearest == labels).double().mean().item())
    with pytest.raises(ValueError, match=r"10 image\(s\) have no caption"):
        retrieval_recall(images, class_captions, torch.arange(4), image_ids=torch.where(labels == 3, 9, labels))


def test_rejection_index_unit_shell_mode():
    g = torch.Generator().manual_seed(8)
    centroids = torch.randn(6, 16, generator=g)
    queries = 3 * torch.randn(5, 16, generator=g)  # far from the unit shell
    found = RejectionIndex(centroids, 2.0, -1.0, backend="torch", query_norm="unit").search(queries, k=6)
    distances = torch.gather(torch.cdist(queries, centroids) ** 2 / 16, 1, found.indices)
    torch.testing.assert_close(found.logits, 2.0 * (1 - distances), rtol=1e-4, atol=1e-4)
    assert torch.equal(found.abstained, found.logits.max(1).values < -1.0)
    with pytest.raises(ValueError, match="query_norm must be one of"):
        RejectionIndex(centroids, 2.0, -1.0, query_norm="norm")
