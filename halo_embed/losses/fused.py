"""HALO's cross-entropy with an analytic backward: the faithful numbers with far fewer N x K passes.

The faithful computation (:func:`halo_embed.losses.functional.halo_cross_entropy`)
materialises about ten ``N x K`` tensors (dot products, shifted logits, the
``K + 1`` concatenation, true logits, masks, target logits, targets, padded
targets, log-probabilities, and autograd's copies). This module computes the
same loss and gradients block by block of rows:

- the shifted logits come out of one ``addmm`` whose bias row is ``-g |c|^2 / D``;
  the abstain column is never materialised (its logit enters the
  log-sum-exp as a constant);
- the teacher-free targets are the softmax of ``where(positive, 0, true / ls)``
  floored :data:`EXP_FLOOR` below their row maximum (0, at the positives),
  taken from the true logits with scalar bounds; label smoothing with one
  positive per row is never stored (``ls/K`` is subtracted, ``1 - ls`` scattered);
- every exponential is taken in place by :func:`_exp_` (``exp2`` of log2-scaled
  arguments on CPU, a third of ``exp``'s time);
- ``exp(s - max)`` is written into the logits' own buffer; its row sums give
  the log-sum-exp, and one row factor turns it into ``q`` over ``[K + 1]``
  (the abstain column is never stored); softmax arguments are floored
  :data:`EXP_FLOOR` nats below their row's maximum;
- for ``mean``/``sum`` the gradients are computed in the forward pass while
  the block is in memory, already scaled by ``1/N`` (the backward hands them
  over, scaling only by a ``grad_out`` other than 1), for ``none`` the
  backward recomputes each block; the loss totals are whole-block dot products;
- the temperature's gradient is assembled from the ``K x D`` product ``G^T x``
  and the column sums of ``G``, which the centroid gradient needs anyway, so
  the logits need not be kept;
- the radial term costs no ``N x D`` pass on CPU: ``|x - c_y|^2/D`` is
  ``|x|^2/D - s_iy/g`` (rows where that cancels, :data:`RADIAL_CANCELLATION`,
  are taken directly), and its gradient ``w_i (x_i - c_y)`` rides in the
  matmuls: ``-w_i/alpha`` is added to ``G`` at ``(i, y_i)`` (which gives the
  ``c_y`` parts of both gradients) and ``dx = w x + alpha G c`` is one
  row-scaled copy of ``x`` and one ``addmm_``.

With ``chunk_size`` the blocks are ``chunk_size x K``: the full ``N x K``
matrix never exists (large label spaces, huge contrastive batches), and the
true logits are not returned. A block with more than
:data:`CLASS_CHUNK_ELEMENTS` logits is also split by candidates and done in
two passes (:func:`_class_chunked_block`: online log-sum-exp and target
statistics, then the gradients with the logits recomputed), so the loss's
own memory stays a few ``chunk_size x (CLASS_CHUNK_ELEMENTS / chunk_size)``
buffers whatever ``K``.

Math (per row ``i``, candidates ``j``; ``s`` shifted logits, ``L`` the
log-sum-exp over ``[s_i, abstain_bias]``, ``p`` the targets, ``q = exp(s - L)``):
``ce_i = L_i - sum_j p_ij s_ij`` and ``d ce_i / d s_ij = q_ij - p_ij``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

#: In chunked mode, a block of rows never holds more logits than this (16 MiB in fp32): wider label
#: spaces are processed ``CLASS_CHUNK_ELEMENTS // chunk_size`` candidates at a time, in two passes
#: (:func:`_class_chunked_block`), so the loss's own memory no longer grows with ``K``.
CLASS_CHUNK_ELEMENTS = 2**22

#: On CPU the radial term's ``|x - c_y|^2/D`` is taken from the logits (``|x|^2/D - s_iy/g``) unless it is
#: below this fraction of ``|x|^2/D + |c_y|^2/D``, where the difference loses too many digits: such rows
#: are computed directly.
RADIAL_CANCELLATION = 0.25

#: ``log2(e)``: :func:`_exp_` takes ``exp(z)`` as ``exp2(z * LOG2E)``.
LOG2E = 1.4426950408889634


class Positives:
    """Which candidates are each row's positives: one column per row, or equal ids."""

    def __init__(self, columns: Tensor | None = None, row_ids: Tensor | None = None,
                 col_ids: Tensor | None = None) -> None:
        if (columns is None) == (row_ids is None or col_ids is None):
            raise ValueError("give either columns, or row_ids and col_ids")
        self.columns, self.row_ids, self.col_ids = columns, row_ids, col_ids

    def _local(self, rows: slice, cols: slice | None, width: int) -> tuple[Tensor, Tensor | None]:
        """Each row's positive column inside the block ``cols`` (clamped into it), and whether it is there."""
        columns = self.columns[rows]
        if cols is None:
            return columns, None
        local = columns - cols.start
        inside = (local >= 0) & (local < width)
        return local.clamp(0, width - 1), inside

    def set_in_block(self, z: Tensor, rows: slice, value: Tensor, cols: slice | None = None) -> None:
        """``z[i, j] = value[i]`` at the positives of the block's rows (in place); ``cols``: the block's columns."""
        if self.columns is not None:
            local, inside = self._local(rows, cols, z.shape[1])
            index = local.unsqueeze(1)
            if inside is not None:   # rows whose positive is elsewhere write back what they read (no sync)
                value = torch.where(inside, value, z.gather(1, index).squeeze(1))
            z.scatter_(1, index, value.unsqueeze(1))
        else:
            col_ids = self.col_ids if cols is None else self.col_ids[cols]
            mask = self.row_ids[rows].unsqueeze(1) == col_ids.unsqueeze(0)
            torch.where(mask, value.unsqueeze(1), z, out=z)

    def block_mask(self, rows: slice, shape: tuple[int, int], device, cols: slice | None = None) -> Tensor:
        if self.columns is not None:
            local, inside = self._local(rows, cols, shape[1])
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            mask.scatter_(1, local.unsqueeze(1), True if inside is None else inside.unsqueeze(1))
            return mask
        col_ids = self.col_ids if cols is None else self.col_ids[cols]
        return self.row_ids[rows].unsqueeze(1) == col_ids.unsqueeze(0)


@dataclass(frozen=True)
class _Problem:
    """What every block of one loss evaluation shares: ``(N, D)`` queries ``x``, ``(K, D)`` candidates ``c``,
    the temperature ``g``, ``|c_j|^2 / D``, the sink's ``bias``, label smoothing ``ls``, ``distill``, the
    :class:`Positives` and whether the radial NLL is added."""

    x: Tensor
    c: Tensor
    g: float
    centroid_sq: Tensor | None
    bias: float
    ls: float
    distill: bool
    positives: Positives
    radial: bool

    def fields(self) -> tuple[Tensor, Tensor, float, Tensor | None, float, float, bool, Positives, bool]:
        return (self.x, self.c, self.g, self.centroid_sq, self.bias, self.ls, self.distill, self.positives,
                self.radial)


@dataclass
class _Grads:
    """Gradient accumulators of ``x`` (``(n, D)``, created by the first block: see :func:`_accumulate`), ``c``
    and the temperature ``g``."""

    n: int
    c: Tensor
    g: Tensor
    x: Tensor | None = None

    @classmethod
    def zeros(cls, x: Tensor, c: Tensor) -> "_Grads":
        return cls(x.shape[0], torch.zeros_like(c), torch.zeros((), dtype=x.dtype, device=x.device))

    def of_x(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x) if self.x is None else self.x


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j a_ij b_ij`` per row."""
    return torch.linalg.vecdot(a, b, dim=1)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_ij a_ij b_ij``: one BLAS dot, no temporary (the reductions need only the total)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _row_mean_square(a: Tensor) -> Tensor:
    """:func:`halo_embed.geometry.mean_square` as ``(N,)``, without its ``(N, D)`` temporary (no autograd)."""
    return torch.linalg.vector_norm(a, dim=1).square_().div_(a.shape[1])


def _exp_(z: Tensor, scale: float = 1.0) -> Tensor:
    """``exp(scale * z)`` written over ``z`` (no overflow guard: callers subtract their row maximum first).

    On CPU as ``exp2`` of ``z * scale * log2(e)``: torch's vectorised ``exp2`` takes about a third of
    ``exp``'s time there (70 vs 170-250 us for 4096 x 100 floats at 2 threads) and is as accurate: the
    rescaled argument's rounding costs ~1e-6 relative at the :data:`EXP_FLOOR`, as much as fp32 ``exp``'s
    own error there. The row exponentials are most of a block's elementwise time. Elsewhere ``exp``.
    """
    if z.device.type == "cpu":
        return z.mul_(scale * LOG2E).exp2_()
    return (z.mul_(scale) if scale != 1.0 else z).exp_()


def _radial_distances(xb: Tensor, c: Tensor, columns: Tensor, x_sq: Tensor, s_pos: Tensor, g: float,
                      centroid_sq: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``|x_i - c_{y_i}|^2 / D`` of a block's rows, which rows were taken directly, and their ``c_y - x``.

    On CPU from what the block has already computed (``|x|^2/D - s_iy / g``, no ``(b, D)`` pass), except
    for rows where that difference cancels (the distance below :data:`RADIAL_CANCELLATION` of
    ``|x|^2/D + |c_y|^2/D``): those (returned as an index, usually empty) are taken directly, so an
    embedding on or near its centroid still gives the faithful value. Elsewhere every row directly
    (``None``: no host synchronisation to find the few).
    """
    if xb.device.type != "cpu":
        offset = torch.index_select(c, 0, columns).sub_(xb)
        return _row_mean_square(offset), None, offset
    r_sq = torch.sub(x_sq, s_pos, alpha=1.0 / g)
    direct = (r_sq < (x_sq + centroid_sq[columns]) * RADIAL_CANCELLATION).nonzero().squeeze(1)
    if not direct.numel():
        return r_sq, direct, None
    offset = torch.index_select(c, 0, columns[direct]).sub_(xb[direct])
    r_sq[direct] = _row_mean_square(offset)
    return r_sq, direct, offset


def _block(problem: _Problem, rows: slice, weights: Tensor | None, want_true: bool, grads: _Grads | None,
           per_row: bool = True, scale: float = 1.0):
    """Loss of one block of rows over all ``K`` candidates; accumulates the gradients into ``grads`` when given.

    ``weights``: ``(b,)`` per-row upstream gradient, or ``None`` for a constant 1;
    the gradients are multiplied by ``scale`` as well (``1/N`` for ``mean``).
    ``per_row``: return the ``(b,)`` losses, else only their sum (cheaper: whole-block
    dots instead of row dots); the radial NLL is added at each row's (single) positive column when
    ``problem.radial``. Returns ``(loss, true (b, K) or None)``.
    """
    x, c, g, centroid_sq, bias, ls, distill, positives, radial = problem.fields()
    d, k = x.shape[1], c.shape[0]
    xb = x[rows]
    x_sq = _row_mean_square(xb)
    s = geometry.shifted_logits_addmm(xb, c, g, centroid_sq)
    g_xsq = x_sq * g
    columns = positives.columns[rows] if positives.columns is not None else None
    # the logit at each row's positive (the radial distance and the smoothed targets' dot need it)
    s_pos = s.gather(1, columns.unsqueeze(1)).squeeze(1) if columns is not None else None
    true = None
    if want_true:   # the reference's clamp(s - g|x|^2/D, max=0)
        true = torch.sub(s, g_xsq.unsqueeze(1)).clamp_(max=0.0)
    p = None
    if distill and ls > 0:
        # softmax(where(pos, 0, min(s - g|x|^2/D, 0) / ls)): the row maximum is 0 (at the positives), the
        # floor EXP_FLOOR below it, applied before the 1/ls so that the scaling rides in _exp_ (scalar
        # bounds: torch's clamp is much slower with tensor ones)
        if true is not None:
            z = torch.clamp(true, min=-EXP_FLOOR * ls)
        else:
            z = torch.sub(s, g_xsq.unsqueeze(1)).clamp_(min=-EXP_FLOOR * ls, max=0.0)
        positives.set_in_block(z, rows, x_sq.new_zeros(()).expand(z.shape[0]))
        p = _exp_(z, 1.0 / ls)
        p.div_(p.sum(dim=1, keepdim=True))   # the row sums are >= 1: exp(0) at the positives
        del z
        target_dot = _rowdot(p, s) if per_row else _flat_dot(p, s)
    elif columns is not None:
        # label smoothing (or its ls -> 0 limit with distillation), one positive per row: the targets are
        # ls/K everywhere plus 1 - ls at the positive, and are never stored
        row_sums = s.sum(dim=1) if per_row else s.sum()
        target_dot = (row_sums * (ls / k)).add_(s_pos if per_row else s_pos.sum(), alpha=1.0 - ls)
    else:
        # label smoothing with several positives: ls/K + (1 - ls) spread over the positives
        mask = positives.block_mask(rows, tuple(s.shape), s.device)
        share = (1.0 - ls) / mask.sum(dim=1, keepdim=True).to(s.dtype)
        p = torch.where(mask, share + ls / k, torch.full_like(s, ls / k))
        del mask
        target_dot = _rowdot(p, s) if per_row else _flat_dot(p, s)
    # exp(s - max) in the logits' own buffer (torch's logsumexp would allocate a (b, K) temporary)
    row_max = s.amax(dim=1, keepdim=True)
    e = _exp_(s.sub_(row_max).clamp_(min=-EXP_FLOOR))
    s = None
    row_max = row_max.squeeze(1)
    lse = torch.logaddexp(e.sum(dim=1).log_().add_(row_max), torch.tensor(bias, dtype=e.dtype, device=e.device))
    nll = w = None
    if radial:
        r_sq, direct, offset = _radial_distances(xb, c, columns, x_sq, s_pos, g, centroid_sq)
        nll, w = geometry.radial_nll_and_grad(r_sq, d)
    if grads is not None:
        # d ce / d s = softmax over [s, bias] - p, at the K candidates (the abstain column has no
        # parameters): exp(s - lse) = e * exp(max - lse), formed in the same buffer
        factor = row_max.sub_(lse).clamp_(min=-EXP_FLOOR).exp_()
        row_scale = None if weights is None else weights * scale
        if row_scale is None:
            grad = e.mul_(factor.mul_(scale).unsqueeze(1))
            if p is not None:
                grad.sub_(p, alpha=scale)
            else:
                grad.sub_(scale * ls / k)
        else:
            grad = e.mul_(factor.mul_(row_scale).unsqueeze(1))
            if p is not None:
                grad.sub_(p.mul_(row_scale.unsqueeze(1)))
            else:
                grad.sub_(row_scale.unsqueeze(1) * (ls / k))
        e = p = None
        alpha = 2.0 * g / d
        if not (distill and ls > 0) and columns is not None:
            # the smoothed targets' 1 - ls at the positive
            pos_weight = torch.full_like(x_sq, (1.0 - ls) * scale) if row_scale is None else row_scale * (1.0 - ls)
            grad.scatter_add_(1, columns.unsqueeze(1), pos_weight.neg_().unsqueeze(1))
        pull = None
        if radial:
            # d nll / d x = w' (x - c_y) and d nll / d c_y = w' (c_y - x), w' = d nll / d r_sq * 2/D
            w.mul_(2.0 / d).mul_(scale if row_scale is None else row_scale)
            if direct is None:   # every row from its c_y - x (off the CPU)
                pull, pull_rows, w = offset.mul_(w.unsqueeze(1)), None, None
            else:
                # the c_y part is the logit gradient's at (i, y_i) with -w'/alpha added, so it rides in the
                # matmuls below, and the x part is a row scaling of x; except on the rows taken directly,
                # where w' is large and the two parts would cancel: those from their c_y - x
                if direct.numel():
                    pull, pull_rows = offset.mul_(w[direct].unsqueeze(1)), direct
                    w[direct] = 0.0
                grad.scatter_add_(1, columns.unsqueeze(1), (w * (-1.0 / alpha)).unsqueeze(1))
        _accumulate(grads, grad, xb, c, g, centroid_sq, rows, dx_rows=w,
                    g_correction=None if w is None else (w @ s_pos) / (alpha * g))
        if pull is not None:
            grads.c.index_add_(0, columns if pull_rows is None else columns[pull_rows], pull)
            if pull_rows is None:
                grads.x[rows].sub_(pull)
            else:
                grads.x.index_add_(0, pull_rows + rows.start, pull, alpha=-1.0)
    if per_row:
        ce = lse.sub_(target_dot)
        return (ce.add_(nll) if radial else ce), true
    total = lse.sum() - target_dot
    return (total + nll.sum() if radial else total), true


def _accumulate(grads: _Grads, grad: Tensor, xb: Tensor, c: Tensor, g: float, centroid_sq: Tensor,
                rows: slice, dx_rows: Tensor | None = None, x_sq_weight: Tensor | None = None,
                g_correction: Tensor | None = None) -> None:
    """Add the gradients of ``sum_ij grad_ij * s_ij`` (and of the extra terms below) for one block of rows.

    ``s_ij = g (2 x_i.c_j - |c_j|^2) / D``: with ``col = sum_i grad_ij``,
    ``dx = 2g/D grad @ c``, ``dc = 2g/D (grad^T x - col c)`` and
    ``dg = 2/D <grad^T x, c> - col . |c|^2/D`` (the ``K x D`` product serves both,
    so the temperature costs no pass over ``x``).
    ``dx_rows`` (b,) adds ``dx_rows[i] * x_i`` to ``dx`` (the radial term's part);
    ``x_sq_weight`` (b,) adds ``-g * w_i * |x_i|^2/D`` (the true logits' row constant);
    ``g_correction`` is added to ``dg``.
    """
    d = xb.shape[1]
    alpha = 2.0 * g / d
    grad_x = grad.T @ xb
    col = grad.sum(dim=0)
    dg = (2.0 / d) * _flat_dot(grad_x, c) - col @ centroid_sq
    grads.g += dg if g_correction is None else dg + g_correction
    grads.c.add_(grad_x, alpha=alpha).addcmul_(col.unsqueeze(1), c, value=-alpha)
    if grads.x is None and rows.start == 0 and rows.stop == grads.n:
        # one block: its gradient becomes x's (no copy)
        if dx_rows is None:
            out = torch.addmm(xb, grad, c, beta=0.0, alpha=alpha)   # beta=0: xb only gives the shape
        else:
            out = torch.mul(xb, dx_rows.unsqueeze(1)).addmm_(grad, c, alpha=alpha)
        grads.x = out
    else:
        if grads.x is None:
            grads.x = xb.new_zeros((grads.n, d))
        out = grads.x[rows]
        if dx_rows is not None:
            out.addcmul_(xb, dx_rows.unsqueeze(1))
        out.addmm_(grad, c, alpha=alpha)
    if x_sq_weight is not None:
        out.addcmul_(xb, x_sq_weight.unsqueeze(1), value=-alpha)
        grads.g -= x_sq_weight @ _row_mean_square(xb)


def _class_chunked_block(problem: _Problem, rows: slice, weights: Tensor | None, grads: _Grads | None,
                         per_row: bool, scale: float, class_chunk: int):
    """:func:`_block` for a block of rows whose ``b x K`` logits are too many to hold: ``class_chunk``
    candidates at a time, in two passes.

    The first pass combines each chunk's log-sum-exp (and the targets' normaliser and dot product) into
    the row's; the second, only when gradients are wanted, recomputes each chunk's logits and forms
    ``d ce / d s = q - p`` and its products chunk by chunk. Peak memory: three ``b x class_chunk`` buffers.
    """
    x, c, g, centroid_sq, bias, ls, distill, positives, radial = problem.fields()
    d, k = x.shape[1], c.shape[0]
    alpha = 2.0 * g / d
    xb = x[rows]
    b = xb.shape[0]
    g_xsq = _row_mean_square(xb).mul_(g).unsqueeze(1)
    chunks = _blocks(k, class_chunk)
    zero = xb.new_zeros(b)
    run_max = xb.new_full((b,), float("-inf"))
    run_sum = xb.new_zeros(b)
    target_norm, target_dot, n_pos, pos_sum, all_sum = xb.new_zeros(b), xb.new_zeros(b), None, None, None
    smoothed = not (distill and ls > 0)
    if smoothed:
        n_pos, pos_sum, all_sum = xb.new_zeros(b), xb.new_zeros(b), xb.new_zeros(b)

    def logits(cols: slice) -> Tensor:
        return geometry.shifted_logits_addmm(xb, c[cols], g, centroid_sq[cols])

    def distill_weights(s: Tensor, cols: slice) -> Tensor:
        """``exp(t)`` of the targets' logits ``t = where(pos, 0, max(min(s - g|x|^2/D, 0), -floor) / ls)``."""
        z = torch.sub(s, g_xsq).clamp_(min=-EXP_FLOOR * ls, max=0.0)
        positives.set_in_block(z, rows, zero, cols)
        return _exp_(z, 1.0 / ls)

    for cols in chunks:   # pass 1: the row statistics
        s = logits(cols)
        if smoothed:
            mask = positives.block_mask(rows, tuple(s.shape), s.device, cols)
            n_pos += mask.sum(dim=1)
            pos_sum += torch.where(mask, s, 0.0).sum(dim=1)
            all_sum += s.sum(dim=1)
            del mask
        else:
            t = distill_weights(s, cols)
            target_norm += t.sum(dim=1)
            target_dot += _rowdot(t, s)
            del t
        chunk_max = s.amax(dim=1)
        chunk_sum = _exp_(s.sub_(chunk_max.unsqueeze(1)).clamp_(min=-EXP_FLOOR)).sum(dim=1)
        new_max = torch.maximum(run_max, chunk_max)
        run_sum = run_sum.mul_((run_max - new_max).exp_()).add_(chunk_sum.mul_((chunk_max - new_max).exp_()))
        run_max = new_max
        del s
    lse = torch.logaddexp(run_sum.log().add_(run_max), torch.tensor(bias, dtype=xb.dtype, device=xb.device))
    if smoothed:
        target_dot = all_sum.mul_(ls / k).add_(pos_sum.mul_((1.0 - ls) / n_pos))
    else:
        target_dot = target_dot.div_(target_norm)
    ce = lse - target_dot
    offset = None
    if radial:   # c_y - x, taken directly: a few (b, D) passes, small beside the (b, K) work
        columns = positives.columns[rows]
        offset = torch.index_select(c, 0, columns).sub_(xb)
        nll, coefficient = geometry.radial_nll_and_grad(_row_mean_square(offset), d)
        ce.add_(nll)
    if grads is not None:
        row_scale = xb.new_full((b,), scale) if weights is None else weights * scale
        # q = exp(max(s - max, -floor) + max(max - lse, -floor)), as in the one-pass block
        shift = run_max - (run_max - lse).clamp_(min=-EXP_FLOOR)
        floor = (run_max - EXP_FLOOR).unsqueeze(1)
        if grads.x is None:
            grads.x = xb.new_zeros((grads.n, d))
        dx = grads.x[rows]
        if smoothed:
            pos_weight = (row_scale * (1.0 - ls) / n_pos).unsqueeze(1)
            flat = (row_scale * (ls / k)).unsqueeze(1)
        else:
            inverse_norm = row_scale.div(target_norm).unsqueeze(1)
        scale_col = row_scale.unsqueeze(1)
        for cols in chunks:   # pass 2: the gradients
            s = logits(cols)
            grad = _exp_(torch.clamp(s, min=floor).sub_(shift.unsqueeze(1))).mul_(scale_col)
            if smoothed:
                mask = positives.block_mask(rows, tuple(s.shape), s.device, cols)
                grad.sub_(flat).sub_(torch.where(mask, pos_weight, 0.0))
                del mask
            else:
                grad.sub_(distill_weights(s, cols).mul_(inverse_norm))
            grads.g += _flat_dot(grad, s) / g
            del s
            dc = grads.c[cols]
            dc.addmm_(grad.T, xb, alpha=alpha).addcmul_(grad.sum(dim=0).unsqueeze(1), c[cols], value=-alpha)
            dx.addmm_(grad, c[cols], alpha=alpha)
            del grad
        if radial:
            coefficient.mul_(row_scale).mul_(2.0 / d)
            radial_pull = offset.mul_(coefficient.unsqueeze(1))
            grads.c.index_add_(0, columns, radial_pull)
            dx.sub_(radial_pull)
    return (ce if per_row else ce.sum()), None


def _blocks(n: int, chunk_size: int | None):
    step = chunk_size or n
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _run_block(problem: _Problem, rows: slice, weights: Tensor | None, want_true: bool, grads: _Grads | None,
               per_row: bool, scale: float, chunk_size: int | None):
    """One block of rows: over all candidates at once, or (chunked mode, more than
    :data:`CLASS_CHUNK_ELEMENTS` logits in the block) over chunks of candidates."""
    b, k = rows.stop - rows.start, problem.c.shape[0]
    if chunk_size is not None and b * k > CLASS_CHUNK_ELEMENTS:
        class_chunk = max(1, CLASS_CHUNK_ELEMENTS // b)
        return _class_chunked_block(problem, rows, weights, grads, per_row, scale, class_chunk)
    return _block(problem, rows, weights, want_true, grads, per_row, scale)


class _FusedHALOCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, temperature, positives, bias, ls, distill, reduction, chunk_size, want_true,  # type: ignore[override]
                radial):
        problem = _Problem(x, c, float(temperature), _row_mean_square(c), bias, ls, distill, positives, radial)
        n = x.shape[0]
        reduced = reduction in ("mean", "sum")
        # the gradients are formed while the logits are in memory, unless no backward can follow
        precompute = reduced and any(ctx.needs_input_grad[:3])
        grads = _Grads.zeros(x, c) if precompute else None
        scale = 1.0 / n if reduction == "mean" else 1.0
        losses, trues = [], []
        for rows in _blocks(n, chunk_size):
            # the precomputed gradients carry the 1/N already: the backward scales only by a grad_out != 1
            ce, true = _run_block(problem, rows, None, want_true, grads, not reduced, scale, chunk_size)
            losses.append(ce)
            if true is not None:
                trues.append(true)
        if reduced:
            out = (losses[0] if len(losses) == 1 else torch.stack(losses).sum()) * scale
        else:
            out = losses[0] if len(losses) == 1 else torch.cat(losses)
        # (a single block is returned as it is: cat would copy the whole (N, K) matrix)
        true = (trues[0] if len(trues) == 1 else torch.cat(trues)) if want_true else x.new_empty(0)
        ctx.setup = (positives, bias, ls, distill, reduction, chunk_size, want_true, scale, radial)
        ctx.save_for_backward(x, c, temperature)
        # Not saved tensors: the first backward takes them over (and scales them in place), so
        # neither autograd's version check nor the graph keeps a second copy alive.
        if precompute:
            grads.x = grads.of_x(x)
        ctx.precomputed = grads
        ctx.set_materialize_grads(False)
        if not want_true:
            ctx.mark_non_differentiable(true)
        return out, true

    @staticmethod
    def backward(ctx, grad_out, grad_true):  # type: ignore[override]
        positives, bias, ls, distill, reduction, chunk_size, want_true, scale, radial = ctx.setup
        x, c, temperature = ctx.saved_tensors
        g = float(temperature)
        pre, ctx.precomputed = ctx.precomputed, None
        needs_logits = pre is None or (want_true and grad_true is not None)
        centroid_sq = _row_mean_square(c) if needs_logits else None
        problem = _Problem(x, c, g, centroid_sq, bias, ls, distill, positives, radial)
        if grad_out is not None and reduction != "none":
            if pre is None:  # a second backward through a retained graph: the same operations again
                pre = _Grads.zeros(x, c)
                for rows in _blocks(x.shape[0], chunk_size):
                    _run_block(problem, rows, None, False, pre, False, scale, chunk_size)
                pre.x = pre.of_x(x)
            # handed over (scaled in place unless grad_out is 1, as for loss.backward() on CPU): autograd
            # can keep them as .grad without a copy
            if grad_out.device.type == "cpu" and not grad_out.requires_grad and float(grad_out) == 1.0:
                grads = pre
            else:
                grads = _Grads(pre.n, pre.c.mul_(grad_out), pre.g * grad_out, pre.x.mul_(grad_out))
        else:
            grads = _Grads.zeros(x, c)
            if grad_out is not None:  # reduction "none": recompute every block with its rows' weights
                for rows in _blocks(x.shape[0], chunk_size):
                    _run_block(problem, rows, grad_out[rows], False, grads, False, 1.0, chunk_size)
        if want_true and grad_true is not None:
            for rows in _blocks(x.shape[0], chunk_size):
                xb = x[rows]
                s = geometry.shifted_logits_addmm(xb, c, g, centroid_sq)
                # true = min(s - g|x|^2/D, 0): the gradient passes where the clamp did not act
                # (|x|^2/D as in the forward, so that the mask matches the clamp exactly)
                passes = s.sub_(_row_mean_square(xb).mul_(g).unsqueeze(1)) <= 0
                grad = torch.where(passes, grad_true[rows], torch.zeros((), dtype=xb.dtype, device=xb.device))
                _accumulate(grads, grad, xb, c, g, centroid_sq, rows, x_sq_weight=grad.sum(dim=1))
        return (grads.of_x(x), grads.c, grads.g.reshape(temperature.shape),
                None, None, None, None, None, None, None, None)


def fused_halo_cross_entropy(
    embeddings: Tensor,
    centroids: Tensor,
    temperature: Tensor,
    positives: Positives,
    abstain_bias: float,
    label_smoothing: float,
    distill: bool,
    reduction: str = "mean",
    chunk_size: int | None = None,
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
        temperature: the effective temperature ``g``, shape ``(1,)``, may require grad.
        positives: :class:`Positives`.
        abstain_bias / label_smoothing / distill: as in the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size: rows per block (``None``: one block). Peak memory is a few
            ``chunk_size x K`` buffers; the true logits are then not returned.
        return_true: also return the ``(N, K)`` true logits (with gradient).
        radial: add HALO's radial NLL of each row's distance to its positive
            (classification: ``positives`` given as columns), so the loss is
            the complete HALO loss without an ``N x D`` gather in autograd.

    Returns:
        ``(ce, true_logits or None)``. Higher-order gradients are not supported.
    """
    want_true = return_true and chunk_size is None
    if radial and positives.columns is None:
        raise ValueError("radial=True needs positives given as one column per row")
    ce, true = _FusedHALOCrossEntropy.apply(
        embeddings, centroids, temperature, positives, float(abstain_bias), float(label_smoothing), bool(distill),
        reduction, chunk_size, want_true, bool(radial),
    )
    return ce, (true if want_true else None)
