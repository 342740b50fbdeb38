"""A deliberately plain re-statement of the published HALO loss, written from
HALO_MATH.md (the project's write-up of the reference ``halo.py``), used only as
the oracle for parity tests. It keeps the reference's behaviour, defects
included (inf/NaN on a zero radius, ``cen[target]`` indexing), and evaluates in
a chosen dtype so that gradients can also be compared in float64.
"""

import math

import torch
import torch.nn.functional as F


class ReferenceHALOLoss(torch.nn.Module):
    def __init__(self, emb_dims, num_classes, learn_gamma=True, distill=True,
                 label_smoothing=0.1, reduction="mean", dtype=torch.float32):
        super().__init__()
        self.D, self.K = float(emb_dims), float(num_classes)
        self.distill, self.ls, self.reduction, self.dtype = distill, label_smoothing, reduction, dtype
        r_sq_target = 1.0 - 2.0 / self.D
        init_gamma = 20.0 / (2.0 - r_sq_target)
        if label_smoothing > 0:
            hi, lo = 1.0 - label_smoothing + label_smoothing / self.K, label_smoothing / self.K
        else:
            hi, lo = 0.99, 0.01 / self.K
        self.abstain_bias = init_gamma * (1.0 - r_sq_target) - math.log(hi / lo)
        start = init_gamma if init_gamma > 20.0 else math.log(math.expm1(init_gamma))
        self.gamma = torch.nn.Parameter(torch.tensor([start], dtype=dtype), requires_grad=learn_gamma)

    def forward(self, pos, target, centroids, centroid_targets):
        pos, cen = pos.to(self.dtype), centroids.to(self.dtype)
        n = pos.shape[0]
        x_sq = (pos * pos).mean(-1, keepdim=True)
        y_sq = (cen * cen).mean(-1, keepdim=True)
        g = F.softplus(self.gamma)
        shifted = g * (2.0 * (pos @ cen.T) / self.D - y_sq.T)
        logits = torch.cat([shifted, torch.full((n, 1), self.abstain_bias, dtype=self.dtype)], -1)
        true = torch.clamp(shifted - g * x_sq, max=0.0)
        with torch.no_grad():
            if self.distill:
                mask = target[:, None] == centroid_targets[None, :]
                p = F.softmax(torch.where(mask, 0.0, true / self.ls), -1)
            else:
                k = shifted.shape[1]
                p = torch.full_like(shifted, self.ls / k)
                p[torch.arange(n), target] = 1.0 - self.ls + self.ls / k
            p = torch.cat([p, torch.zeros(n, 1, dtype=self.dtype)], -1)
        # cross-entropy with probability targets, spelled out
        ce = -(p * F.log_softmax(logits, -1)).sum(-1)
        r_sq = ((pos - cen[target]) ** 2).mean(-1)
        vc = 0.5 - 1.0 / self.D
        radial = -(vc * torch.log(r_sq) - 0.5 * r_sq)
        if self.reduction == "mean":
            return ce.mean() + radial.mean(), true
        if self.reduction == "none":
            return ce + radial, true
        raise NotImplementedError(self.reduction)
