"""Switch a module's train/eval mode for a while, then give every submodule its own flag back.

`module.train(was_training)` would not do: it sets one flag on every submodule, undoing a
user's deliberate `bn.eval()` inside a train-mode net.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["set_mode"]


@contextmanager
def set_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put `module` and all its submodules in one mode; restore each one's own flag afterwards.

    Args:
        module: the module to switch.
        training: `True` for train mode, `False` for eval mode.

    Yields:
        `module`, in the requested mode.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with set_mode(net, False):
        ...     net.training, net[0].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
