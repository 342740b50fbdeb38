import pytest
import torch
import torch.multiprocessing as mp

from halo_embed.losses import PairedHALOLoss
from dist_paired_worker import PairModel, global_batch, uneven_gather_worker, uneven_rows, worker
from reference_paired import reference_paired_loss


def features(n=10, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, d, generator=g, dtype=dtype)
    texts = images + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)
    return images, texts


@pytest.mark.parametrize("distill", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("extras", [(0.0, 0.0), (0.7, 0.3)])
def test_matches_slow_per_sample_reference(distill, symmetric, with_ids, extras):
    images, texts = features()
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6]) if with_ids else torch.arange(10)
    rejection_weight, norm_weight = extras
    loss_fn = PairedHALOLoss(8, num_candidates=10, symmetric=symmetric, distill=distill,
                             rejection_weight=rejection_weight, norm_weight=norm_weight).double()
    a_img, a_txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    ours = loss_fn(a_img, a_txt, ids if with_ids else None)
    ours.backward()
    gamma = loss_fn.gamma.detach().clone().requires_grad_(True)
    b_img, b_txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    ref = reference_paired_loss(b_img, b_txt, ids, gamma, 10, distill=distill, symmetric=symmetric,
                                rejection_weight=rejection_weight, norm_weight=norm_weight)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_img.grad, b_img.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_txt.grad, b_txt.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss_fn.gamma.grad, gamma.grad, rtol=1e-9, atol=1e-12)


def test_ids_default_to_one_image_per_pair():
    images, texts = features(dtype=torch.float32)
    loss_fn = PairedHALOLoss(8, num_candidates=10)
    torch.testing.assert_close(loss_fn(images, texts), loss_fn(images, texts, torch.arange(10) + 100))


def test_parts_and_bias():
    images, texts = features(dtype=torch.float32)
    loss_fn = PairedHALOLoss(8, num_candidates=10)
    loss, parts = loss_fn(images, texts, return_parts=True)
    assert set(parts) == {"image_to_text", "text_to_image", "radial", "temperature"}
    torch.testing.assert_close(loss, 0.5 * (parts["image_to_text"] + parts["text_to_image"]) + parts["radial"])
    from halo_embed import geometry
    assert loss_fn.abstain_bias == geometry.abstain_bias(8, 10, 0.1)


def test_the_implementation_is_stated_never_silently_changed():
    """The fused kernel has no absent-positive term: unset, a loss with one runs (and says it runs) the
    faithful implementation; asked for explicitly, fused with it is an error."""
    assert PairedHALOLoss(16, 8).implementation == "fused"
    assert PairedHALOLoss(16, 8, rejection_weight=0.5).implementation == "faithful"
    assert "implementation='faithful'" in repr(PairedHALOLoss(16, 8, rejection_weight=0.5))
    with pytest.raises(ValueError, match="implementation='fused' has no absent-positive term: rejection_weight=0.5"):
        PairedHALOLoss(16, 8, rejection_weight=0.5, implementation="fused")
    with pytest.raises(ValueError, match="chunk_size needs implementation='fused'"):
        PairedHALOLoss(16, 8, rejection_weight=0.5, chunk_size=4)


def test_half_precision_and_autocast():
    images, texts = features(dtype=torch.float32)
    loss_fn = PairedHALOLoss(8, num_candidates=10)
    expected = loss_fn(images.bfloat16().float(), texts.bfloat16().float())
    torch.testing.assert_close(loss_fn(images.bfloat16(), texts.bfloat16()), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_fn(images, texts).dtype == torch.float32


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(4, 8), torch.randn(3, 8)), ValueError, r"same shape \(B, D\)"),
        ((torch.randn(4, 6), torch.randn(4, 6)), ValueError, "D=6 dimensions but the loss was built with embed_dim=8"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.zeros(3, dtype=torch.long)), ValueError, r"image_ids must have one id per pair"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.zeros(4)), TypeError, "image_ids must be an integer tensor"),
        ((torch.full((4, 8), float("nan")), torch.randn(4, 8)), ValueError, "image_features contains NaN"),
        ((torch.randn(0, 8), torch.randn(0, 8)), ValueError, "image_features must not be empty"),
    ],
)
def test_validation(args, error, match):
    with pytest.raises(error, match=match):
        PairedHALOLoss(8, num_candidates=4)(*args)
    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        PairedHALOLoss(8, num_candidates=1)


@pytest.mark.parametrize(
    "loss_kwargs, normalization",
    [({}, None), ({"symmetric": False}, None), ({"rejection_weight": 0.5, "norm_weight": 0.5}, None), ({}, "running")],
    ids=["symmetric", "one-way", "extras", "running-normalization"],
)
def test_two_processes_equal_one_process(tmp_path, loss_kwargs, normalization):
    """2 gloo processes on shards == 1 process on the global batch: loss (mean over ranks), DDP gradients and,
    with the running feature normalisation, its global batch statistics and running buffers."""
    check_two_processes(tmp_path, loss_kwargs, normalization, "gloo")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("normalization", [None, "running"])
def test_two_gpus_over_nccl_equal_one_process(tmp_path, normalization):
    """The same over NCCL, one GPU per rank, against one CPU process."""
    check_two_processes(tmp_path, {}, normalization, "nccl")


def check_two_processes(tmp_path, loss_kwargs, normalization, backend):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), loss_kwargs, normalization, backend), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loose = 10.0 if backend == "nccl" else 1.0   # GPU kernels sum in other orders than the CPU reference

    model = PairModel(PairedHALOLoss(8, num_candidates=8, **loss_kwargs), normalization)
    x_img, x_txt, ids = global_batch()
    loss = model(x_img, x_txt, ids)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-6 * loose,
                               atol=1e-6 * loose)
    for name, p in model.named_parameters():
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5 * loose, atol=1e-6 * loose, msg=name)
    for name, b in model.named_buffers():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], b, rtol=1e-6 * loose, atol=1e-6 * loose, msg=name)


def test_gather_with_uneven_shards(tmp_path):
    """Ranks with 2 and 3 rows: both see all 5 rows in rank order; each rank's gradient is the sum over all
    ranks' losses of the gradient on its own rows (what DDP's averaging turns into the global-batch gradient)."""
    mp.spawn(uneven_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"uneven{r}.pt") for r in range(2)]
    rows = uneven_rows()
    everything = torch.cat(rows)
    weights = torch.arange(everything.numel(), dtype=torch.float32).view_as(everything)
    for rank, out in enumerate(ranks):
        torch.testing.assert_close(out["gathered"], everything)
        torch.testing.assert_close(out["no_grad"], everything)
        assert out["offset"] == (0, 2)[rank]
        own = slice(out["offset"], out["offset"] + rows[rank].shape[0])
        torch.testing.assert_close(out["grad"], weights[own] * (1 + 2))  # rank losses weighted 1 and 2

