"""ResNet-18 in its CIFAR form: a 3x3 stem, no max-pool, four stages of two basic blocks.

``width`` scales every stage (64 = the standard network, 11.2M parameters);
the head is one linear layer to ``out_dim`` (class logits for cross-entropy,
the embedding for HALO).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet18"]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """``(N, 3, 32, 32) -> (N, out_dim)``.

    Args:
        out_dim: size of the final linear layer.
        width: channels of the first stage (64 for the standard network).
    """

    def __init__(self, out_dim: int, width: int = 64) -> None:
        super().__init__()
        if out_dim < 1 or width < 1:
            raise ValueError(f"out_dim and width must be positive, got {out_dim}, {width}")
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            layers += [BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
            channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, out_dim)

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features ``(N, 8 * width)``."""
        return self.pool(self.layers(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
