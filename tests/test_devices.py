"""The losses and the search on every device present: the CPU always, CUDA where it exists (marker ``cuda``).

The CUDA cases are skipped without a GPU; their CPU twins run the same code
everywhere, so the checks themselves are exercised by ``make test``.
"""

import math

import pytest
import torch

from halo_embed import HALOLoss
from halo_embed.losses import PairedHALOLoss

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def classification_batch(device, n=64, d=16, k=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 1.3
    c = torch.randn(k, d, generator=g)
    return x.to(device), c.to(device), torch.randint(0, k, (n,), generator=g).to(device)


def loss_and_grads(loss_fn, x, y, c, dtype=None):
    """Loss, d/dx, d/dc and d/dgamma; with ``dtype``, the inputs are cast to it inside bf16/fp16 autocast."""
    x = x.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, _ = loss_fn(x if dtype is None else x.to(dtype), y, c if dtype is None else c.to(dtype))
    loss.backward()
    return [loss, x.grad, c.grad, loss_fn.gamma.grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation,chunk_size", [("fused", None), ("fused", 16)])
def test_fused_and_chunked_match_faithful_on_device(device, implementation, chunk_size):
    x, c, y = classification_batch(device)
    ours = loss_and_grads(HALOLoss(16, 11, implementation=implementation, chunk_size=chunk_size).to(device), x, y, c)
    # the oracle: the faithful loss in float64 on the CPU
    oracle = loss_and_grads(HALOLoss(16, 11, implementation="faithful").double(),
                            x.double().cpu(), y.cpu(), c.double().cpu())
    for a, b in zip(ours, oracle):
        assert a.device.type == device
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_computes_in_fp32_on_device(device):
    """bf16 inputs under autocast: the loss upcasts, so it equals fp32 on the bf16-rounded inputs."""
    x, c, y = classification_batch(device)
    x, c = x.bfloat16().float(), c.bfloat16().float()  # the values bf16 can hold
    autocast = loss_and_grads(HALOLoss(16, 11).to(device), x, y, c, dtype=torch.bfloat16)
    plain = loss_and_grads(HALOLoss(16, 11).to(device), x, y, c)
    assert autocast[0].dtype == torch.float32
    assert rel_err(autocast[0], plain[0]) <= 1e-5  # the loss itself: fp32 arithmetic
    for a, b in zip(autocast[1:], plain[1:]):  # gradients come back through the bf16 casts: bf16 resolution
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 2 ** -7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_paired_loss_on_device_matches_cpu_float64(device, chunk_size):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(10, 8, generator=g)
    texts = images + 0.7 * torch.randn(10, 8, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    results = []
    for dev, dtype, chunk in ((device, torch.float32, chunk_size), ("cpu", torch.float64, None)):
        img = images.to(dev, dtype).clone().requires_grad_(True)
        txt = texts.to(dev, dtype).clone().requires_grad_(True)
        loss_fn = PairedHALOLoss(8, num_candidates=10, chunk_size=chunk).to(dev, dtype)
        loss = loss_fn(img, txt, ids.to(dev))
        loss.backward()
        results.append([loss, img.grad, txt.grad, loss_fn.gamma.grad])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-5


def faiss_distributions() -> list[str]:
    """The installed distributions that ship the top-level module ``faiss``."""
    import importlib.metadata

    return sorted({dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()
                   if any(str(f).replace("\\", "/") == "faiss/__init__.py" for f in dist.files or ())})


def test_exactly_one_faiss_package():
    """faiss-gpu and faiss-cpu both install `faiss/`: an install has the one pyproject's markers pick here."""
    import importlib.metadata

    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(r) for r in importlib.metadata.requires("halo-embed") or ()]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("halo-embed is not installed as a package here (run from a source folder)")
    wanted = [r.name for r in requirements if r.name.startswith("faiss") and (r.marker is None or r.marker.evaluate())]
    assert len(wanted) == 1 and faiss_distributions() == wanted


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_faiss_index_kind_runs_on_the_cpu(kind):
    """Whatever the FAISS build, each index kind answers on the CPU (and with use_gpu=None where no GPU is)."""
    from halo_embed.eval.retrieval import VectorIndex, faiss_has_gpu, import_faiss

    gpu = faiss_has_gpu(import_faiss())  # False for faiss-cpu, or faiss-gpu without a CUDA device
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 32, generator=g)
    queries = base[:40] + 0.01 * torch.randn(40, 32, generator=g)
    for metric in ("l2", "cosine"):
        exact = VectorIndex(base, metric, "torch").search(queries, 5)
        for use_gpu in (False, None):
            index = VectorIndex(base, metric, "faiss", kind, use_gpu=use_gpu, nlist=16, nprobe=16)
            assert index.on_gpu == (use_gpu is None and gpu and kind != "hnsw")
            found = index.search(queries, 5)
            assert torch.equal(found.indices[:, 0], torch.arange(40))  # each query's own item first
            overlap = (found.indices[:, :, None] == exact.indices[:, None, :]).any(-1).float().mean()
            assert overlap >= (1.0 if kind != "hnsw" else 0.95)


@pytest.mark.cuda
def test_faiss_reports_gpu_support_where_cuda_exists():
    from halo_embed.eval.retrieval import faiss_has_gpu, import_faiss

    if faiss_distributions() != ["faiss-gpu"]:
        pytest.skip(f"the installed FAISS is {faiss_distributions()}, not faiss-gpu")
    assert faiss_has_gpu(import_faiss())


@pytest.mark.cuda
def test_gpu_faiss_finds_the_cpu_neighbours():
    from halo_embed.eval.retrieval import VectorIndex, faiss_has_gpu, import_faiss

    if not faiss_has_gpu(import_faiss()):
        pytest.skip("the installed faiss has no GPU support")
    g = torch.Generator().manual_seed(0)
    base, queries = torch.randn(2000, 64, generator=g), torch.randn(50, 64, generator=g)
    for metric in ("l2", "cosine"):
        gpu = VectorIndex(base, metric, "faiss", use_gpu=True)
        cpu = VectorIndex(base, metric, "faiss", use_gpu=False)
        assert gpu.on_gpu and not cpu.on_gpu
        assert torch.equal(gpu.search(queries, 10).indices, cpu.search(queries, 10).indices)


def test_amp_bf16_finetune_resume_replays_exactly(tmp_path, tiny_model_dirs):
    """Five fine-tune steps with --precision amp_bf16 == three, stop, resume, two more (bit for bit), on the
    device the recipe picks: CUDA where present (its RNG state is part of the checkpoint), else the CPU."""
    import json

    from safetensors.torch import load_file

    from halo_embed.recipes.clip_finetune import FinetuneConfig, train

    def config(name, **overrides):
        return FinetuneConfig(model=f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", shapes_train_images=48,
                              shapes_val_images=24, batch_size=8, max_steps=5, save_every=3, log_every=1,
                              eval_images=24, warmup=2, adapter_samples=16, logs=str(tmp_path), name=name,
                              progress=False, lr=1e-3, precision="amp_bf16", report_to="none", **overrides)

    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed-precision setting per process: the other tests' fp32 runs set it first
    AcceleratorState._reset_state()
    try:
        train(config("straight"))
        train(config("resumed", resume=str(tmp_path / "straight" / "checkpoints" / "step-0000003")))
    finally:
        AcceleratorState._reset_state()  # and the tests after this one run in fp32 again
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    losses = {name: [r["loss"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                     if "resumed" not in r]  # the resume's own line says where it resumed, and has no loss
              for name in ("straight", "resumed")}
    assert losses["resumed"] == losses["straight"][3:] and all(math.isfinite(v) for v in losses["straight"])
