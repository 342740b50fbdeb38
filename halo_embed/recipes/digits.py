"""HALO vs cross-entropy on scikit-learn's handwritten digits, with unknown classes held out.

What it produces (2 CPU cores, a few seconds): for an MLP trained on digits
0-6 only, the test accuracy on known digits and how often the model abstains on
known digits and on the never-seen digits 7, 8 and 9. The data ships with
scikit-learn, so this runs offline anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import HALOHead, HALOLoss, HALOModel


@dataclass
class DigitsConfig:
    """Every default of the digits recipe, in one place."""

    unknown_digits: tuple[int, ...] = (7, 8, 9)
    test_fraction: float = 0.3
    hidden: int = 256
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    label_smoothing: float = 0.1
    seed: int = 0


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_unknown: torch.Tensor
    num_classes: int


def load_digits_split(config: DigitsConfig) -> DigitsData:
    """Known digits split into train/test (stratified); every unknown digit goes to the OOD set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    unknown = np.isin(y, config.unknown_digits)
    known_labels = np.unique(y[~unknown])
    remap = {int(label): i for i, label in enumerate(known_labels)}
    y_known = np.array([remap[int(v)] for v in y[~unknown]])
    x_train, x_test, y_train, y_test = train_test_split(
        x[~unknown], y_known, test_size=config.test_fraction, stratify=y_known, random_state=config.seed
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    norm = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return DigitsData(
        norm(x_train), torch.from_numpy(y_train), norm(x_test), torch.from_numpy(y_test),
        norm(x[unknown]), len(known_labels),
    )


def _backbone(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


def train_halo(data: DigitsData, config: DigitsConfig) -> tuple[HALOModel, HALOLoss]:
    """Train an MLP + HALO (embedding dimension = number of classes, as published)."""
    torch.manual_seed(config.seed)
    k = data.num_classes
    model = HALOModel(_backbone(data.x_train.shape[1], config.hidden, k), k, k)
    loss_fn = HALOLoss(k, k, label_smoothing=config.label_smoothing)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    n = data.x_train.shape[0]
    for _ in range(config.epochs):
        for batch in torch.randperm(n, generator=generator).split(config.batch_size):
            embeddings, centroids = model(data.x_train[batch])
            loss, _ = loss_fn(embeddings, data.y_train[batch], centroids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval(), loss_fn


def run(config: DigitsConfig | None = None) -> dict[str, float]:
    """Train HALO on the known digits; return accuracy and abstention rates."""
    config = config or DigitsConfig()
    data = load_digits_split(config)
    model, loss_fn = train_halo(data, config)
    head = HALOHead.from_trained(model, loss_fn)
    with torch.no_grad():
        known = head(model(data.x_test)[0])
        unknown = head(model(data.x_unknown)[0])
    return {
        "accuracy": (known.labels == data.y_test).float().mean().item(),
        "abstain_known": known.abstained.float().mean().item(),
        "abstain_unknown": unknown.abstained.float().mean().item(),
    }
