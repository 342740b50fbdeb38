"""Workers for the 2-process tests of PairedHALOLoss (gloo on CPU, NCCL on two GPUs), started by torch.multiprocessing."""

import os
import sys

import torch
import torch.distributed as dist


class PairModel(torch.nn.Module):
    """Two linear towers, optionally the feature adapter, and the loss (so DDP also averages gamma's gradient)."""

    def __init__(self, loss, normalization=None):
        from halo_embed.clip.adapter import FeatureAdapter

        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(6, 8)
        self.text = torch.nn.Linear(5, 8)
        self.adapter = FeatureAdapter(8, normalization=normalization, momentum=0.5) if normalization else None
        self.loss = loss

    def forward(self, x_img, x_txt, ids):
        images, texts = self.image(x_img), self.text(x_txt)
        if self.adapter is not None:
            images, texts = self.adapter(images, "image"), self.adapter(texts, "text")
        return self.loss(images, texts, ids)


def global_batch(n=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])[:n]  # captions of the same image across ranks too
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g), ids


def leave() -> None:
    """End a finished rank without the interpreter's shutdown: with torch 2.14's gloo, a spawned rank
    sometimes aborts there ("terminate called without an active exception", SIGABRT) after its work and
    its result file are complete. Reached only on success; a failing rank raises before it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank, world_size, init_file, out_dir, loss_kwargs, normalization=None, backend="gloo"):
    """One rank of DDP over the paired loss: gloo on the CPU, or NCCL with rank ``r`` on GPU ``r``."""
    from halo_embed.losses import PairedHALOLoss

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = PairModel(PairedHALOLoss(8, num_candidates=8, **loss_kwargs), normalization).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if backend == "nccl" else None)
        x_img, x_txt, ids = (t.to(device) for t in global_batch())
        shard = slice(rank * 4, (rank + 1) * 4)
        loss = ddp(x_img[shard], x_txt[shard], ids[shard])
        loss.backward()
        grads = {name: p.grad.cpu() for name, p in model.named_parameters()}
        buffers = {name: b.cpu() for name, b in model.named_buffers()}
        torch.save({"loss": loss.detach().cpu(), "grads": grads, "buffers": buffers},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # DDP's reducer must be gone, and both ranks done, before the group is torn down
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


def uneven_gather_worker(rank, world_size, init_file, out_dir):
    """Rank r holds r + 2 rows; gather them with gradients and back-propagate a loss over the gathered rows."""
    from halo_embed.distributed import all_gather_no_grad, all_gather_with_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = uneven_rows()[rank].clone().requires_grad_()
        gathered, offset = all_gather_with_grad(rows)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
        (weights * gathered).sum().mul(rank + 1).backward()  # each rank's loss differs
        torch.save({"gathered": gathered.detach(), "offset": offset, "grad": rows.grad,
                    "no_grad": all_gather_no_grad(rows.detach())}, os.path.join(out_dir, f"uneven{rank}.pt"))
        dist.barrier()  # both ranks done before the group is torn down
    finally:
        dist.destroy_process_group()
    leave()


def uneven_rows():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(r + 2, 3, generator=g) for r in range(2)]
