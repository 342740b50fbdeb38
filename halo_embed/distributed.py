"""Distributed communication, in one small module.

Every collective halo-embed uses is here. Nothing in this module needs
``accelerate``: it works under any launcher that initialises a
``torch.distributed`` process group (``accelerate launch``, ``torchrun``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "every_process", "is_distributed"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _row_counts(x: Tensor) -> list[int]:
    """Every rank's number of rows (ranks may hold different batch sizes)."""
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def _gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    """all_gather along dim 0, padding to the longest rank and trimming again."""
    longest = max(counts)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; the backward pass returns each rank the gradient
    of the *sum of all ranks' losses* with respect to its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        ctx.start, ctx.length = sum(counts[:rank]), counts[rank]
        return _gather_rows(x, list(counts))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        # all_reduce works on every backend (gloo has no reduce_scatter); the cost is
        # one gradient-sized buffer per rank, the same as the gathered features.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.length], None


def all_gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Gather ``x`` (rows) from all ranks, keeping gradients to every rank's rows.

    Returns ``(gathered, offset)`` where ``offset`` is the row at which this
    rank's own rows start. Outside a process group: ``(x, 0)``.

    With each rank computing a mean over its local queries and DDP averaging
    the parameter gradients, the result equals the single-process gradient of
    the mean over the global batch (see :class:`~halo_embed.losses.PairedHALOLoss`).
    """
    if not is_distributed():
        return x, 0
    counts = _row_counts(x)
    return _AllGatherWithGrad.apply(x, tuple(counts)), sum(counts[: dist.get_rank()])


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's rows of ``x`` (no gradient); ``x`` outside a process group."""
    if not is_distributed():
        return x
    return _gather_rows(x, _row_counts(x))


def every_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``True`` when ``flag`` holds on every process (one tiny all-reduce; ``flag`` itself when not
    distributed), e.g. "I still have a batch", so that all processes stop together."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
