"""HALO's cross-entropy with an analytic backward: the faithful numbers with far fewer N x K passes.

The faithful computation (:func:`halo_embed.losses.functional.halo_cross_entropy`)
materialises about ten ``N x K`` tensors (dot products, shifted logits, the
``K + 1`` concatenation, true logits, masks, target logits, targets, padded
targets, log-probabilities, and autograd's copies). This module computes the
same loss and gradients block by block of rows:

- the shifted logits come out of one ``addmm`` whose bias row is ``-g |c|^2 / D``;
  the abstain column is never materialised (its logit enters the
  log-sum-exp as a constant);
- the teacher-free targets use softmax's shift invariance: the targets of
  ``where(positive, 0, (s - g|x|^2/D) / ls)`` equal those of ``min(s, g|x|^2/D) / ls``
  with the positives set to ``g|x|^2/D / ls`` (the clamp of the reference
  is the ``min``);
- ``exp(s - max)`` is written into the logits' own buffer; its row sums give
  the log-sum-exp, and one row factor turns it into ``q`` over ``[K + 1]``
  (the abstain column is never stored); softmax arguments are floored
  :data:`EXP_FLOOR` nats below their row's maximum;
- for ``mean``/``sum`` the gradients are computed in the forward pass while
  the block is in memory (the backward only scales them), for ``none`` the
  backward recomputes each block; the loss totals are whole-block dot products;
- the temperature's gradient is assembled from the ``K x D`` product ``G^T x``
  and the column sums of ``G``, which the centroid gradient needs anyway, so
  the logits need not be kept;
- the radial term's ``c_y - x`` buffer, scaled, becomes the embedding
  gradient in place (``addmm_`` with ``beta=-1``).

With ``chunk_rows`` the blocks are ``chunk_rows x K``: the full ``N x K``
matrix never exists (large label spaces, huge contrastive batches), and the
true logits are not returned.

Math (per row ``i``, candidates ``j``; ``s`` shifted logits, ``L`` the
log-sum-exp over ``[s_i, abstain_bias]``, ``p`` the targets, ``q = exp(s - L)``):
``ce_i = L_i - sum_j p_ij s_ij`` and ``d ce_i / d s_ij = q_ij - p_ij``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import geometry

__all__ = ["Positives", "fused_halo_cross_entropy"]

#: Softmax arguments more than this many nats below their row's maximum are raised to it, and so
#: is the abstain column's lead over the candidates when it scales the softmax. Without the floor
#: a row whose logits span more than ~87 nats (common once the temperature has grown) gives exp
#: arguments that underflow, on which torch's vectorised exp is 20-50x slower, and denormal
#: probabilities, which slow the backward's matmuls as well: 6x on a whole step
#: (``benchmarks/bench_exp_underflow.py``). What the floor changes is at most exp(-30) ~ 1e-13 per
#: entry relative to the row's largest probability, below fp32 resolution for K up to ~10^6.
EXP_FLOOR = 30.0


class Positives:
    """Which candidates are each row's positives: one column per row, or equal ids."""

    def __init__(self, columns: Tensor | None = None, row_ids: Tensor | None = None,
                 col_ids: Tensor | None = None) -> None:
        if (columns is None) == (row_ids is None or col_ids is None):
            raise ValueError("give either columns, or row_ids and col_ids")
        self.columns, self.row_ids, self.col_ids = columns, row_ids, col_ids

    def set_in_block(self, z: Tensor, rows: slice, value: Tensor) -> None:
        """``z[i, j] = value[i]`` at the positives of the block's rows (in place)."""
        if self.columns is not None:
            z.scatter_(1, self.columns[rows].unsqueeze(1), value.unsqueeze(1))
        else:
            mask = self.row_ids[rows].unsqueeze(1) == self.col_ids.unsqueeze(0)
            torch.where(mask, value.unsqueeze(1), z, out=z)

    def block_mask(self, rows: slice, shape: tuple[int, int], device) -> Tensor:
        if self.columns is not None:
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            mask.scatter_(1, self.columns[rows].unsqueeze(1), True)
            return mask
        return self.row_ids[rows].unsqueeze(1) == self.col_ids.unsqueeze(0)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j a_ij b_ij`` per row."""
    return torch.linalg.vecdot(a, b, dim=1)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_ij a_ij b_ij``: one BLAS dot, no temporary (the reductions need only the total)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _row_mean_square(a: Tensor) -> Tensor:
    """:func:`halo_embed.geometry.mean_square` as ``(N,)``, without its ``(N, D)`` temporary (no autograd)."""
    return torch.linalg.vector_norm(a, dim=1).square_().div_(a.shape[1])


def _softmax_(z: Tensor) -> Tensor:
    """Row softmax of a ``(b, K)`` block written over its input: no second ``(b, K)`` buffer.

    On CPU through the out= form of torch's own kernel (it finishes reading a row
    before writing it); elsewhere spelled out, since other backends' kernels make
    no such promise.
    """
    if z.device.type == "cpu" and z.is_contiguous():
        return torch.ops.aten._softmax.out(z, 1, False, out=z)
    z.sub_(z.amax(dim=1, keepdim=True)).exp_()
    return z.div_(z.sum(dim=1, keepdim=True))


def _block(x: Tensor, c: Tensor, g: float, centroid_sq: Tensor, bias: float, ls: float, distill: bool,
           positives: Positives, rows: slice, weights: Tensor | None, want_true: bool, grads: dict[str, Any] | None,
           radial: bool = False, per_row: bool = True):
    """Loss of one block of rows; accumulates the weighted gradients into ``grads`` when given.

    ``weights``: ``(b,)`` per-row upstream gradient, or ``None`` for a constant 1
    (the caller scales). ``radial``: add each row's radial NLL at its (single)
    positive column. ``per_row``: return the ``(b,)`` losses, else only their sum
    (cheaper: whole-block dots instead of row dots). Returns ``(loss, true (b, K) or None)``.
    """
    d = x.shape[1]
    xb = x[rows]
    x_sq = _row_mean_square(xb)
    s = geometry.shifted_logits_addmm(xb, c, g, centroid_sq)
    g_xsq = x_sq.mul_(g)
    true = None
    if want_true:   # the reference's clamp(s - g|x|^2/D, max=0)
        true = torch.sub(s, g_xsq.unsqueeze(1)).clamp_(max=0.0)
    if distill and ls > 0:
        # softmax(where(pos, 0, min(s - g|x|^2/D, 0)/ls)) == softmax(where(pos, g|x|^2/D, min(s, g|x|^2/D))/ls);
        # the row maximum is g|x|^2/D (at the positives): the floor is EXP_FLOOR * ls below it
        z = torch.clamp(s, min=g_xsq.unsqueeze(1) - EXP_FLOOR * ls, max=g_xsq.unsqueeze(1))
        positives.set_in_block(z, rows, g_xsq)
        p = _softmax_(z.mul_(1.0 / ls))
        del z
    else:
        # label smoothing, or its ls -> 0 limit with distillation: ls/K + (1 - ls) spread over the positives
        mask = positives.block_mask(rows, tuple(s.shape), s.device)
        share = (1.0 - ls) / mask.sum(dim=1, keepdim=True).to(s.dtype)
        p = torch.where(mask, share + ls / s.shape[1], torch.full_like(s, ls / s.shape[1]))
        del mask
    target_dot = _rowdot(p, s) if per_row else _flat_dot(p, s)
    # exp(s - max) in the logits' own buffer (torch's logsumexp would allocate a (b, K) temporary)
    row_max = s.amax(dim=1, keepdim=True)
    e = s.sub_(row_max).clamp_(min=-EXP_FLOOR).exp_()
    s = None
    row_max = row_max.squeeze(1)
    lse = torch.logaddexp(e.sum(dim=1).log_().add_(row_max), torch.tensor(bias, dtype=e.dtype, device=e.device))
    grad = radial_pull = None
    if grads is not None:
        # d ce / d s = softmax over [s, bias] - p, at the K candidates (the abstain column has no
        # parameters): exp(s - lse) = e * exp(max - lse), formed in the same buffer
        grad = e.mul_(row_max.sub_(lse).clamp_(min=-EXP_FLOOR).exp_().unsqueeze(1)).sub_(p)
        if weights is not None:
            grad.mul_(weights.unsqueeze(1))
    e = p = None
    if radial:   # after p is gone, so its (b, D) buffer does not raise the peak
        # c_y - x, taken directly (not from the logits) so that an embedding on its centroid
        # gives exactly the faithful value
        columns = positives.columns[rows]
        offset = torch.index_select(c, 0, columns).sub_(xb)
        nll, coefficient = geometry.radial_nll_and_grad(_row_mean_square(offset), d)
        if grads is not None:
            # d nll / d c_y = coefficient * (c_y - x) = -d nll / d x, with d r_sq / d x = 2 (x - c_y) / D
            coefficient.mul_(2.0 / d)
            if weights is not None:
                coefficient.mul_(weights)
            radial_pull = offset.mul_(coefficient.unsqueeze(1))
            grads["c"].index_add_(0, columns, radial_pull)
        offset = None
    if grad is not None:
        _accumulate(grads, grad, xb, c, g, centroid_sq, rows, dx_extra=radial_pull)
    if per_row:
        ce = lse.sub_(target_dot)
        return (ce.add_(nll) if radial else ce), true
    total = lse.sum() - target_dot
    return (total + nll.sum() if radial else total), true


def _accumulate(grads: dict[str, Any], grad: Tensor, xb: Tensor, c: Tensor, g: float, centroid_sq: Tensor,
                rows: slice, dx_extra: Tensor | None = None, x_sq_weight: Tensor | None = None) -> None:
    """Add the gradients of ``sum_ij grad_ij * s_ij`` (and of the extra terms below) for one block of rows.

    ``s_ij = g (2 x_i.c_j - |c_j|^2) / D``: with ``col = sum_i grad_ij``,
    ``dx = 2g/D grad @ c``, ``dc = 2g/D (grad^T x - col c)`` and
    ``dg = 2/D <grad^T x, c> - col . |c|^2/D`` (the ``K x D`` product serves both,
    so the temperature costs no pass over ``x``).
    ``dx_extra`` (b, D) is subtracted from ``dx`` inside the matmul (the radial term);
    ``x_sq_weight`` (b,) adds ``-g * w_i * |x_i|^2/D`` (the true logits' row constant).
    """
    d = xb.shape[1]
    alpha = 2.0 * g / d
    grad_x = grad.T @ xb
    col = grad.sum(dim=0)
    grads["g"] += (2.0 / d) * _flat_dot(grad_x, c) - col @ centroid_sq
    grads["c"].add_(grad_x, alpha=alpha).addcmul_(col.unsqueeze(1), c, value=-alpha)
    if grads["x"] is None and rows.start == 0 and rows.stop == grads["n"]:
        # one block: its gradient becomes x's (no copy), the radial term riding in the matmul's beta
        if dx_extra is None:
            out = torch.addmm(xb, grad, c, beta=0.0, alpha=alpha)   # beta=0: xb only gives the shape
        else:   # in dx_extra's own buffer
            out = dx_extra.addmm_(grad, c, beta=-1.0, alpha=alpha)
        grads["x"] = out
    else:
        if grads["x"] is None:
            grads["x"] = xb.new_zeros((grads["n"], d))
        out = grads["x"][rows]
        out.addmm_(grad, c, alpha=alpha)
        if dx_extra is not None:
            out.sub_(dx_extra)
    if x_sq_weight is not None:
        out.addcmul_(xb, x_sq_weight.unsqueeze(1), value=-alpha)
        grads["g"] -= x_sq_weight @ _row_mean_square(xb)


def _blocks(n: int, chunk_rows: int | None):
    step = chunk_rows or n
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _new_grads(x: Tensor, c: Tensor) -> dict[str, Any]:
    """Gradient accumulators; ``x``'s is created by the first block (see :func:`_accumulate`)."""
    return {"x": None, "n": x.shape[0], "c": torch.zeros_like(c),
            "g": torch.zeros((), dtype=x.dtype, device=x.device)}


def _x_grad(grads: dict[str, Any], x: Tensor) -> Tensor:
    return torch.zeros_like(x) if grads["x"] is None else grads["x"]


class _FusedHALOCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, gamma, positives, bias, ls, distill, reduction, chunk_rows, want_true, radial):  # type: ignore[override]
        g = float(gamma)
        centroid_sq = _row_mean_square(c)
        n = x.shape[0]
        reduced = reduction in ("mean", "sum")
        # the gradients are formed while the logits are in memory, unless no backward can follow
        precompute = reduced and any(ctx.needs_input_grad[:3])
        grads = _new_grads(x, c) if precompute else None
        losses, trues = [], []
        for rows in _blocks(n, chunk_rows):
            ce, true = _block(x, c, g, centroid_sq, bias, ls, distill, positives, rows, None, want_true, grads,
                              radial, per_row=not reduced)
            losses.append(ce)
            if true is not None:
                trues.append(true)
        scale = 1.0 / n if reduction == "mean" else 1.0
        out = torch.stack(losses).sum() * scale if reduced else torch.cat(losses)
        # (a single block is returned as it is: cat would copy the whole (N, K) matrix)
        true = (trues[0] if len(trues) == 1 else torch.cat(trues)) if want_true else x.new_empty(0)
        ctx.setup = (positives, bias, ls, distill, reduction, chunk_rows, want_true, scale, radial)
        ctx.save_for_backward(x, c, gamma)
        # Not saved tensors: the first backward takes them over (and scales them in place), so
        # neither autograd's version check nor the graph keeps a second copy alive.
        ctx.precomputed = (_x_grad(grads, x), grads["c"], grads["g"]) if precompute else None
        ctx.set_materialize_grads(False)
        if not want_true:
            ctx.mark_non_differentiable(true)
        return out, true

    @staticmethod
    def backward(ctx, grad_out, grad_true):  # type: ignore[override]
        positives, bias, ls, distill, reduction, chunk_rows, want_true, scale, radial = ctx.setup
        x, c, gamma = ctx.saved_tensors
        g = float(gamma)
        centroid_sq = _row_mean_square(c)
        pre, ctx.precomputed = ctx.precomputed, None
        if grad_out is not None and reduction != "none":
            if pre is None:  # a second backward through a retained graph: the same operations again
                grads = _new_grads(x, c)
                for rows in _blocks(x.shape[0], chunk_rows):
                    _block(x, c, g, centroid_sq, bias, ls, distill, positives, rows, None, False, grads, radial,
                           per_row=False)
                pre = (_x_grad(grads, x), grads["c"], grads["g"])
            # scaled in place and handed over: autograd can keep them as .grad without a copy
            factor = grad_out * scale
            grads = {"x": pre[0].mul_(factor), "c": pre[1].mul_(factor), "g": pre[2] * factor}
        else:
            grads = _new_grads(x, c)
            if grad_out is not None:  # reduction "none": recompute every block with its rows' weights
                for rows in _blocks(x.shape[0], chunk_rows):
                    _block(x, c, g, centroid_sq, bias, ls, distill, positives, rows, grad_out[rows], False, grads,
                           radial, per_row=False)
        if want_true and grad_true is not None:
            for rows in _blocks(x.shape[0], chunk_rows):
                xb = x[rows]
                s = geometry.shifted_logits_addmm(xb, c, g, centroid_sq)
                # true = min(s - g|x|^2/D, 0): the gradient passes where the clamp did not act
                # (|x|^2/D as in the forward, so that the mask matches the clamp exactly)
                passes = s.sub_(_row_mean_square(xb).mul_(g).unsqueeze(1)) <= 0
                grad = torch.where(passes, grad_true[rows], torch.zeros((), dtype=xb.dtype, device=xb.device))
                _accumulate(grads, grad, xb, c, g, centroid_sq, rows, x_sq_weight=grad.sum(dim=1))
        return (_x_grad(grads, x), grads["c"], grads["g"].reshape(gamma.shape),
                None, None, None, None, None, None, None, None)


def fused_halo_cross_entropy(
    embeddings: Tensor,
    centroids: Tensor,
    gamma: Tensor,
    positives: Positives,
    abstain_bias: float,
    label_smoothing: float,
    distill: bool,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    return_true: bool = True,
    radial: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """HALO's cross-entropy over ``[candidates, abstain]``, fused.

    The same value and gradients as
    :func:`halo_embed.losses.functional.halo_cross_entropy` (tested to 1e-5 in
    fp32 and ~1e-12 in fp64).

    Args:
        embeddings: ``(N, D)`` queries (fp32 or fp64).
        centroids: ``(K, D)`` candidates.
        gamma: effective temperature, shape ``(1,)``, may require grad.
        positives: :class:`Positives`.
        abstain_bias / label_smoothing / distill: as in the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_rows: rows per block (``None``: one block). Peak memory is a few
            ``chunk_rows x K`` buffers; the true logits are then not returned.
        return_true: also return the ``(N, K)`` true logits (with gradient).
        radial: add HALO's radial NLL of each row's distance to its positive
            (classification: ``positives`` given as columns), so the loss is
            the complete HALO loss without an ``N x D`` gather in autograd.

    Returns:
        ``(ce, true_logits or None)``. Higher-order gradients are not supported.
    """
    want_true = return_true and chunk_rows is None
    if radial and positives.columns is None:
        raise ValueError("radial=True needs positives given as one column per row")
    ce, true = _FusedHALOCrossEntropy.apply(
        embeddings, centroids, gamma, positives, float(abstain_bias), float(label_smoothing), bool(distill),
        reduction, chunk_rows, want_true, bool(radial),
    )
    return ce, (true if want_true else None)
