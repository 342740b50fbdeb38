"""HALO's geometry, in one place.

Every loss, head, scorer and search in halo-embed computes its logits through
the functions below (the FAISS search relies on the L2 identity documented in
:func:`shifted_logits`), so a change to the math happens here and only here.

Notation (as in the HALO reference): ``N`` embeddings ``x`` of dimension ``D``,
``K`` prototypes (centroids) ``c``, temperature ``g = softplus(gamma)`` (``gamma``: the learnt raw
parameter of the losses; ``temperature`` everywhere else is ``g``). Every
mean is over the embedding dimension, i.e. ``|v|^2 / D``.

The logit of class ``j`` is the negative scaled squared distance
``-g * |x - c_j|^2 / D``; an extra "abstain" class has its prototype at the
origin and a fixed bias, so an input far from every prototype and near the
origin is sent to the sink. Softmax is shift invariant, so the per-row constant
``g * |x|^2 / D`` is added back to every logit (the *shifted* logits), which
turns the distance into a dot product with an L2 penalty on the prototypes and
makes the abstain logit a constant.

Reference: the HALO loss (Hyperspherical Alignment & Latent Optimization) and
its published ``halo.py``; the formulas are written out in ``HALO_MATH.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "INIT_LOGIT_MARGIN",
    "R_SQ_INIT",
    "abstain_bias",
    "abstain_mask",
    "classifier_abstains",
    "abstention_possible",
    "effective_gamma",
    "finite_shifted_and_true_logits",
    "initial_gamma",
    "inverse_softplus",
    "mean_square",
    "mean_squared_distances",
    "pad_abstain_target",
    "pair_decision",
    "pair_logits",
    "pair_mean_square",
    "radial_nll",
    "radial_nll_and_grad",
    "shifted_logits",
    "shifted_logits_addmm",
    "shifted_logits_from_sq_distances",
    "smoothed_targets",
    "target_radius_sq",
    "teacher_free_targets",
    "true_logits",
    "unit_shell_logits",
    "with_abstain",
]

#: Expected mean-square distance between an embedding and a prototype at
#: initialisation, when both have unit per-dimension variance (1 + 1).
R_SQ_INIT = 2.0
#: Logit gap the initial temperature buys between "at the natural radius" and
#: "at the initial distance".
INIT_LOGIT_MARGIN = 20.0


# --------------------------------------------------------------------------
# Constants fixed at construction time (python floats, as in the reference)
# --------------------------------------------------------------------------


def target_radius_sq(embed_dim: int) -> float:
    """Mean-square radius of the natural shell, ``1 - 2/D``.

    It is where the radial NLL :func:`radial_nll` has its minimum: a
    ``D``-dimensional standard Gaussian around a prototype puts its mass at
    mean-square distance close to 1, with the ``-2/D`` from the chi
    distribution's mode.
    """
    return 1.0 - 2.0 / float(embed_dim)


def initial_gamma(embed_dim: int) -> float:
    """The effective temperature at initialisation, ``20 / (2 - (1 - 2/D))``."""
    return INIT_LOGIT_MARGIN / (R_SQ_INIT - target_radius_sq(embed_dim))


def inverse_softplus(value: float) -> float:
    """The raw parameter whose softplus is ``value`` (identity above 20, as in the reference)."""
    if value > 20.0:
        return float(value)
    return math.log(math.expm1(value))


def abstain_bias(embed_dim: int, num_classes: int, label_smoothing: float) -> float:
    """The fixed logit of the abstain class (in shifted terms).

    It is set so that an embedding on the natural shell of its prototype
    (``|x - c|^2/D = 1 - 2/D``) beats the sink by exactly the log-odds margin
    that the training targets ask for: ``t_ideal - margin_ce`` where
    ``t_ideal = initial_gamma * 2/D`` and ``margin_ce = log(max_prob / min_prob)``,
    the log ratio between the true-class and other-class target probabilities
    (from label smoothing, or 0.99 vs 0.01/K without it).
    """
    gamma0 = initial_gamma(embed_dim)
    if label_smoothing > 0:
        max_prob = 1.0 - label_smoothing + label_smoothing / num_classes
        min_prob = label_smoothing / num_classes
    else:
        max_prob = 0.99
        min_prob = 0.01 / num_classes
    margin_ce = math.log(max_prob / min_prob)
    t_ideal = gamma0 * (1.0 - target_radius_sq(embed_dim))
    return t_ideal - margin_ce


# --------------------------------------------------------------------------
# Tensor functions
# --------------------------------------------------------------------------


def effective_gamma(raw_gamma: Tensor) -> Tensor:
    """``softplus(raw_gamma)``: the temperature actually applied (always positive)."""
    return F.softplus(raw_gamma)


def mean_square(x: Tensor) -> Tensor:
    """``|x|^2 / D`` per row: ``(N, D) -> (N, 1)``."""
    return x.pow(2).mean(dim=-1, keepdim=True)


def pair_mean_square(x: Tensor, c: Tensor) -> Tensor:
    """``|x_i - c_i|^2 / D`` of row-aligned pairs: ``(N, D), (N, D) -> (N,)`` (the radial term's ``r_sq``,
    and the distance a pair is judged by)."""
    return (x - c).pow(2).mean(dim=-1)


def shifted_logits(embeddings: Tensor, centroids: Tensor, temperature: Tensor) -> Tensor:
    """HALO's class logits with the per-row constant added back.

    ``shifted[i, j] = g * (2 <x_i, c_j> - |c_j|^2) / D
                    = g * (|x_i|^2 - |x_i - c_j|^2) / D``

    so the arg-max over ``j`` is the nearest prototype in L2 (what an exact or
    approximate L2 index such as FAISS ``IndexFlatL2`` returns), and the
    softmax over ``[shifted, abstain_bias]`` equals the softmax over the true
    negative distances with the sink's logit ``abstain_bias - g |x|^2 / D``.

    Args:
        embeddings: ``(N, D)``.
        centroids: ``(K, D)``.
        temperature: the effective temperature, a tensor broadcastable to ``(N, K)``
            (shape ``(1,)`` or ``()``).

    Returns:
        ``(N, K)`` logits.
    """
    embed_dim = embeddings.shape[-1]
    centroid_sq = mean_square(centroids)
    dot = (embeddings @ centroids.T) / embed_dim
    return temperature * (2.0 * dot - centroid_sq.T)


#: the largest power of two whose square, times a few thousand dimensions, stays finite in float64
_SAFE_MAGNITUDE = 2.0 ** 500


def finite_shifted_and_true_logits(embeddings: Tensor, centroids: Tensor,
                                   temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """:func:`shifted_logits` and :func:`true_logits` in float64 that stay finite (never NaN) for every
    finite input, for inference on inputs of any magnitude (e.g. float64 embeddings near ``1e300``).

    The inputs are divided by a power of two that keeps every square finite, the logits computed there and
    multiplied back; a logit beyond float64's range is clamped to its largest finite value (the softmax of
    such a row is one-hot, as the exact one would be). Ordinary inputs take no scaling, and the result equals
    the float64 :func:`shifted_logits` / :func:`true_logits`.

    Args:
        embeddings: ``(N, D)`` finite.
        centroids: ``(K, D)`` finite.
        temperature: the effective temperature.

    Returns:
        ``(shifted, true)``, both ``(N, K)`` float64.
    """
    x, c = embeddings.double(), centroids.double()
    largest = max(float(x.abs().max()) if x.numel() else 0.0, float(c.abs().max()) if c.numel() else 0.0)
    scale = 1.0
    if largest > _SAFE_MAGNITUDE:
        scale = 2.0 ** math.ceil(math.log2(largest / _SAFE_MAGNITUDE))
        x, c = x / scale, c / scale
    g = temperature.double() if isinstance(temperature, Tensor) else float(temperature)
    shifted = shifted_logits(x, c, g)
    true = torch.clamp(shifted - g * mean_square(x), max=0.0)
    limit = torch.finfo(torch.float64).max
    if scale != 1.0:  # back to the inputs' units; beyond float64's range a logit saturates, it is never NaN
        shifted, true = shifted * scale * scale, true * scale * scale
    return shifted.clamp(-limit, limit), true.clamp(-limit, 0.0)


def shifted_logits_addmm(embeddings: Tensor, centroids: Tensor, temperature: float, centroid_sq: Tensor) -> Tensor:
    """:func:`shifted_logits` for a plain-float ``temperature``, in one ``addmm`` (the fused loss's form).

    Args:
        embeddings: ``(N, D)``.
        centroids: ``(K, D)``.
        temperature: the effective temperature as a float (no autograd through it:
            the fused loss forms its gradient itself).
        centroid_sq: ``(K,)`` mean squares of the centroids, computed once per call of the loss.

    Returns:
        ``(N, K)`` logits ``g * (2 <x, c> - |c|^2) / D``.
    """
    embed_dim = embeddings.shape[-1]
    return torch.addmm(centroid_sq, embeddings, centroids.T, beta=-temperature, alpha=2.0 * temperature / embed_dim)


def shifted_logits_from_sq_distances(
    embeddings: Tensor, sq_distances: Tensor, temperature: Tensor | float
) -> Tensor:
    """The same shifted logits from squared L2 distances (sums, as FAISS ``IndexFlatL2`` returns).

    ``g * (|x|^2 - |x - c|^2) / D`` for the ``k`` candidates an index returned.

    Args:
        embeddings: ``(N, D)`` queries.
        sq_distances: ``(N, k)`` ``|x - c|^2`` (sum over dimensions).
        temperature: effective temperature.

    Returns:
        ``(N, k)``.
    """
    embed_dim = embeddings.shape[-1]
    return temperature * (mean_square(embeddings) - sq_distances / embed_dim)


def unit_shell_logits(mean_sq_distances: Tensor, temperature: Tensor | float) -> Tensor:
    """The shifted logit a query on the unit shell (``|x|^2 / D = 1``) would have: ``g * (1 - |x - c|^2 / D)``.

    HALO's abstain bias is derived for embeddings of unit mean square (the
    ``t_ideal`` of :func:`abstain_bias`), which is where the feature adapter
    puts them at the start of training. Comparing this logit with the abstain
    bias judges a *pair* by its distance alone: the decision no longer
    depends on how far the query itself has drifted from the origin, which the
    ``K + 1`` softmax uses to say whether the query is in-distribution at all.

    Args:
        mean_sq_distances: ``|x - c|^2 / D``, any shape.
        temperature: effective temperature.
    """
    return temperature * (1.0 - mean_sq_distances)


def pair_logits(images: Tensor, texts: Tensor, temperature: Tensor | float) -> Tensor:
    """The pair rule: ``(N, D), (N, D) -> (N,)`` logit of each image against its own caption, the image
    placed on the unit shell (:func:`unit_shell_logits` of :func:`pair_mean_square`); compared with the
    abstain bias it is the built-in accept / reject decision of the scorer and the evaluation."""
    return unit_shell_logits(pair_mean_square(images, texts), temperature)


def pair_decision(mean_sq_distances: Tensor, temperature: Tensor | float,
                  bias: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """HALO's accept / reject rule for pairs: the caption against the sink for the query on the unit shell.

    ``logit = g (1 - |x - t|^2 / D)`` (:func:`unit_shell_logits`), ``p = sigmoid(logit - bias)`` (the
    two-candidate softmax ``[caption, sink]``), ``accept = logit >= bias`` (``p >= 0.5``; a tie accepts,
    as :func:`abstain_mask` lets the caption win ties).

    Args:
        mean_sq_distances: ``|x - t|^2 / D``, any shape.
        temperature: the pair rule's temperature.
        bias: the sink's logit.

    Returns:
        ``(logit, probability, accept)``, each of the input's shape.
    """
    logit = unit_shell_logits(mean_sq_distances, temperature)
    return logit, pair_probability(logit, bias), pair_accepts(logit, bias)


def pair_accepts(logit: Tensor, bias: Tensor | float) -> Tensor:
    """Accept a pair (any shape -> bool): the caption's logit is not below the sink's, the two-candidate case
    of :func:`abstain_mask` (a tie accepts)."""
    return ~abstain_mask(logit.unsqueeze(-1), bias)


def pair_probability(logit: Tensor, bias: Tensor | float) -> Tensor:
    """``p(aligned) = sigmoid(logit - bias)``: the caption's share of the two-candidate softmax
    ``[caption, sink]`` (any shape; saturates to 0 or 1, never NaN, for finite or infinite logits)."""
    return torch.sigmoid(logit - bias)


def true_logits(shifted: Tensor, embeddings: Tensor, temperature: Tensor) -> Tensor:
    """Remove the shift: ``-g * |x - c|^2 / D``, clamped at 0 against rounding.

    Args:
        shifted: ``(N, K)`` from :func:`shifted_logits`.
        embeddings: ``(N, D)``, the same embeddings.
        temperature: the effective temperature used for ``shifted``.

    Returns:
        ``(N, K)``, every entry ``<= 0``.
    """
    return torch.clamp(shifted - temperature * mean_square(embeddings), max=0.0)


def with_abstain(shifted: Tensor, abstain_bias: float | Tensor) -> Tensor:
    """Append the abstain column: ``(N, K) -> (N, K + 1)``, the last column is the sink."""
    rows = shifted.shape[0]
    if isinstance(abstain_bias, Tensor):
        sink = abstain_bias.to(shifted.dtype).reshape(1, 1).expand(rows, 1)
    else:
        sink = shifted.new_full((rows, 1), abstain_bias)
    return torch.cat([shifted, sink], dim=-1)


def abstain_mask(shifted: Tensor, abstain_bias: float | Tensor) -> Tensor:
    """``(N, K) -> (N,)`` bool: the sink's logit is strictly above every class logit.

    This is exactly where ``argmax`` of the ``K + 1`` softmax picks the last
    column (ties go to the class, as ``argmax`` returns the first maximum).
    """
    return shifted.max(dim=-1).values < abstain_bias


def classifier_abstains(shifted: Tensor, true: Tensor, temperature: Tensor | float, decision_bias: float | Tensor,
                        max_mean_sq_distance: float | Tensor = float("inf")) -> Tensor:
    """The classifier's decision: ``(N, K), (N, K) -> (N,)`` bool, decline the input.

    Declined when the sink's logit ``decision_bias`` is strictly above every class logit (the ``K + 1``
    argmax, :func:`abstain_mask`) or the nearest prototype is farther than ``max_mean_sq_distance``
    (``|x - c|^2 / D``, from the true logits ``-g |x - c|^2 / D``; ``inf``: no limit).
    """
    nearest = -true.max(dim=-1).values / temperature
    return abstain_mask(shifted, decision_bias) | (nearest > max_mean_sq_distance)


def abstention_possible(centroids: Tensor, temperature: float | Tensor, abstain_bias: float | Tensor,
                        input_limit: float | None = None) -> bool:
    """Whether any input can make the sink win against the ``(K, D)`` centroids.

    The sink wins at ``x`` when every class logit ``g (2 x . c_k - |c_k|^2) / D``
    is below ``abstain_bias``: ``K`` linear inequalities in ``x``, solved as a
    linear programme (scipy's HiGHS) over inputs whose coordinates lie within
    ``±input_limit`` (default: 10 times the centroids' root mean square; without
    a limit, centroids that are centred only up to rounding would let absurdly
    large inputs abstain). For mean-centred centroids, summing the inequalities
    gives the closed form behind it: the sink can win only if
    ``g m > -abstain_bias`` (``m``: the centroids' mean square), so with
    unit-mean-square prototypes a temperature below ``-abstain_bias`` (e.g. 2.5
    against HALO's bias of -7.1 for ``D = 384, K = 150``) leaves the built-in
    decision accepting every input.
    """
    from scipy.optimize import linprog

    from ._validation import check_float, check_temperature, check_tensor

    check_tensor("centroids", centroids, ndim=2, floating=True, min_rows=1)
    g = check_temperature("temperature", temperature)
    bias = check_float("abstain_bias", abstain_bias)
    c = centroids.detach().double().cpu()
    k, d = c.shape
    limit = 10.0 * float(c.pow(2).mean().sqrt()) if input_limit is None else check_float("input_limit", input_limit)
    if limit <= 0:
        raise ValueError(f"input_limit must be > 0, got {limit}")
    # maximise a slack t <= 1 with 2 c_k . x + t <= |c_k|^2 + D bias / g for every k; the sink can win iff t > 0
    rhs = (c.pow(2).sum(1) + d * bias / g).numpy()
    lhs = torch.cat([2.0 * c, torch.ones(k, 1, dtype=torch.float64)], dim=1).numpy()
    result = linprog([0.0] * d + [-1.0], A_ub=lhs, b_ub=rhs, bounds=[(-limit, limit)] * d + [(None, 1.0)],
                     method="highs")
    return bool(result.status == 0 and -result.fun > 1e-9)


def mean_squared_distances(embeddings: Tensor, centroids: Tensor) -> Tensor:
    """``|x_i - c_j|^2 / D`` for every pair: ``(N, D), (K, D) -> (N, K)``, clamped at 0."""
    embed_dim = embeddings.shape[-1]
    dot = (embeddings @ centroids.T) / embed_dim
    return (mean_square(embeddings) - 2.0 * dot + mean_square(centroids).T).clamp_min(0.0)


def radial_nll(r_sq: Tensor, embed_dim: int) -> Tensor:
    """The radial ("soap bubble") negative log-likelihood of a mean-square distance.

    ``-( (1/2 - 1/D) * log(r_sq) - r_sq / 2 )``: the NLL of the radius of a
    ``D``-dimensional standard Gaussian around the prototype, minimal at
    ``r_sq = 1 - 2/D`` (:func:`target_radius_sq`). It keeps embeddings on a shell
    around their prototype instead of collapsing onto it.

    Unlike the reference, ``r_sq`` is floored at the smallest normal fp32
    number before the log: an embedding exactly on its prototype gives a finite
    loss and a zero radial gradient (its direction is undefined there) instead of
    ``inf`` and NaN. Every ``r_sq`` above that floor is unchanged.

    Args:
        r_sq: ``(N,)`` mean-square distances to the assigned prototype.
        embed_dim: ``D``.

    Returns:
        ``(N,)``.
    """
    volume_coeff = 0.5 - 1.0 / float(embed_dim)
    floor = torch.finfo(torch.float32).tiny
    # in place on log's output: autograd needs only log's input, and the fused loss calls this per block
    return torch.log(r_sq.clamp_min(floor)).mul_(-volume_coeff).add_(r_sq, alpha=0.5)


def radial_nll_and_grad(r_sq: Tensor, embed_dim: int) -> tuple[Tensor, Tensor]:
    """:func:`radial_nll` and ``d radial_nll / d r_sq`` together, for the fused loss (no autograd).

    The derivative is ``1/2 - (1/2 - 1/D) / r_sq``, and ``1/2`` at or below the
    floor (as autograd gives through the clamp), formed in place: the fused
    loss calls this once per block.

    Args:
        r_sq: ``(N,)`` mean-square distances to the assigned prototype.
        embed_dim: ``D``.

    Returns:
        ``(nll, grad)``, both ``(N,)``.
    """
    volume_coeff = 0.5 - 1.0 / float(embed_dim)
    floor = torch.finfo(torch.float32).tiny
    grad = r_sq.clamp_min(floor).reciprocal_().mul_(-volume_coeff).add_(0.5)
    return radial_nll(r_sq, embed_dim), torch.where(r_sq > floor, grad, 0.5)


# --------------------------------------------------------------------------
# Training targets over the K classes (the abstain column always gets 0)
# --------------------------------------------------------------------------


@torch.no_grad()
def teacher_free_targets(true: Tensor, is_target: Tensor, label_smoothing: float) -> Tensor:
    """HALO's self-distilled soft targets, without a teacher.

    Every positive gets logit 0 and every negative its own true logit divided
    by ``label_smoothing``; the softmax of that is the target distribution, so
    a near-miss class gets more mass than a far one (dark knowledge from the
    model's own geometry). With ``label_smoothing == 0`` this is the limit
    ``ls -> 0+``: all mass spread evenly over the positives (the reference
    divides by zero there and yields NaN where a true logit is exactly 0).

    Args:
        true: ``(N, K)`` true logits from :func:`true_logits` (``<= 0``).
        is_target: ``(N, K)`` bool, ``True`` at each row's positive column(s).
        label_smoothing: ``>= 0``.

    Returns:
        ``(N, K)`` rows summing to 1, no gradient.
    """
    if label_smoothing > 0:
        target_logits = torch.where(is_target, 0.0, true / label_smoothing)
        return F.softmax(target_logits, dim=-1)
    positives = is_target.to(true.dtype)
    return positives / positives.sum(dim=-1, keepdim=True)


@torch.no_grad()
def smoothed_targets(
    is_target: Tensor, label_smoothing: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Label smoothing over the ``K`` columns: ``ls/K`` everywhere plus ``1 - ls`` shared by the positives.

    With one positive per row this is the reference's ``1 - ls + ls/K`` at the
    target and ``ls/K`` elsewhere.

    Args:
        is_target: ``(N, K)`` bool, ``True`` at each row's positive column(s).
        label_smoothing: in ``[0, 1)``.

    Returns:
        ``(N, K)`` rows summing to 1, in ``dtype``.
    """
    positives = is_target.to(dtype)
    share = positives / positives.sum(dim=-1, keepdim=True)
    return label_smoothing / is_target.shape[1] + (1.0 - label_smoothing) * share


def pad_abstain_target(probs: Tensor) -> Tensor:
    """``(N, K) -> (N, K + 1)``: the abstain column's target probability is exactly 0."""
    return torch.cat([probs, probs.new_zeros((probs.shape[0], 1))], dim=-1)
