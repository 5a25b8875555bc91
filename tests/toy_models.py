"""Hand-written models and helpers for the tests."""

from __future__ import annotations

import timm
import torch
from torch import nn

import earlyexit


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class ToyNet(nn.Module):
    """A small residual CNN with no timm config (so `input_size` must be given)."""

    def __init__(self, num_classes: int = 5, channels: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(channels) for _ in range(depth)))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(self.dropout(x.mean((2, 3))))


class FeatureNet(nn.Module):
    """Returns a feature map, not class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv(x))


class BranchyNet(ToyNet):
    """Control flow that depends on the data: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


def spread_confidences(net, x: torch.Tensor) -> None:
    """Rescale the untrained confidence branches so that h_i spreads over (0, 1) on `x`."""
    with torch.no_grad():
        out = net.eval().forward_all(x)
        for head, a in zip(net.heads, out.confidence_logits, strict=True):
            scale = a.std().clamp_min(1e-12) / 1.5
            head.confidence.bias.copy_((head.confidence.bias - a.mean()) / scale)
            head.confidence.weight.div_(scale)


def decisive_confidences(net, x: torch.Tensor, seed: int = 0) -> None:
    """Random confidence branches that tell the samples of `x` apart, then `spread_confidences`.

    An untrained `conv` head's confidence barely varies between samples (its prior reads
    nearly uniform logits), so spreading it alone scales it by hundreds, and a half-precision
    rounding then moves h by more than any margin a test could allow; random weights over the
    head's features vary at the scale of the features instead.
    """
    randomize_confidences(net, seed=seed)
    spread_confidences(net, x)


def randomize_confidences(net, scale: float = 1.0, seed: int = 0) -> None:
    """Seeded random confidence weights (`scale` / sqrt(fan-in) times a standard normal) and
    zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in net.heads:
            w = head.confidence.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
            head.confidence.bias.zero_()


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every batch norm statistics and an affine map that are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)


#: How many random inputs the `spread_*` fixtures of conftest.py spread over the exits.
SPREAD_POOL = 40


def spread_resnet20(pool: torch.Tensor, n_exits: int = 3) -> nn.Module:
    """resnet20 with `n_exits` exits, in eval mode, whose confidences spread `pool` out."""
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=n_exits).eval()
    spread_confidences(net, pool)
    return net


def results_alone(net, x: torch.Tensor):
    """Each sample's `net.early_exit` result, computed on that sample alone."""
    with torch.no_grad():
        results = [net.early_exit(x[k : k + 1]) for k in range(len(x))]
    return earlyexit.EarlyExitResult(*(torch.cat(parts) for parts in zip(*results)))
