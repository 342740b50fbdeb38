"""A slow, per-sample statement of the paired HALO loss, used as the oracle.

It works in *unshifted* terms (true negative distances, and the sink's logit
``abstain_bias - g |x|^2 / D``), one query at a time, so a mistake in the
shifted-logit algebra or the batching of the fast loss shows up as a mismatch.
"""

import math

import torch
import torch.nn.functional as F


def reference_paired_loss(images, texts, ids, gamma_raw, num_candidates, ls=0.1, distill=True, symmetric=True,
                          rejection_weight=0.0, norm_weight=0.0):
    d = images.shape[1]
    g = F.softplus(gamma_raw).reshape(())
    r_target = 1 - 2 / d
    gamma0 = 20 / (2 - r_target)
    hi, lo = (1 - ls + ls / num_candidates, ls / num_candidates) if ls > 0 else (0.99, 0.01 / num_candidates)
    bias = gamma0 * (1 - r_target) - math.log(hi / lo)

    def one_query(x, candidates, positive):
        true = torch.stack([-g * ((x - c) ** 2).sum() / d for c in candidates])
        sink = bias - g * (x**2).sum() / d
        logits = torch.cat([true, sink.reshape(1)])
        with torch.no_grad():
            if distill:
                t = torch.where(positive, torch.zeros_like(true), true / ls)
                p = torch.softmax(t, 0)
            else:
                p = ls / len(candidates) + (1 - ls) * positive.double() / positive.sum()
            p = torch.cat([p, torch.zeros(1, dtype=p.dtype)])
        return -(p * torch.log_softmax(logits, 0)).sum()

    n = images.shape[0]
    i2t = sum(one_query(images[i], texts, ids == ids[i]) for i in range(n)) / n
    if symmetric:
        t2i = sum(one_query(texts[j], images, ids == ids[j]) for j in range(n)) / n
        ce = 0.5 * (i2t + t2i)
    else:
        ce = i2t
    vc = 0.5 - 1 / d
    radial = sum(-(vc * torch.log(((images[i] - texts[i]) ** 2).mean()) - 0.5 * ((images[i] - texts[i]) ** 2).mean()) for i in range(n)) / n
    total = ce + radial

    def absent_positive(x, candidates, positive):
        # only the wrong candidates and the sink; the sink is the target
        true = torch.stack([-g * ((x - c) ** 2).sum() / d for c, p in zip(candidates, positive) if not p])
        sink = bias - g * (x**2).sum() / d
        return -torch.log_softmax(torch.cat([true, sink.reshape(1)]), 0)[-1]

    if rejection_weight:
        rej = sum(absent_positive(images[i], texts, ids == ids[i]) for i in range(n)) / n
        if symmetric:
            rej = 0.5 * (rej + sum(absent_positive(texts[j], images, ids == ids[j]) for j in range(n)) / n)
        total = total + rejection_weight * rej
    if norm_weight:
        ms = [(v**2).mean() for v in list(images) + list(texts)]
        total = total + norm_weight * sum(-(vc * torch.log(m) - 0.5 * m) for m in ms) / len(ms)
    return total
