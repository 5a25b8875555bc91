"""earlyexit: early-exit convolutional neural networks (EENets) for any timm or torchvision model.

Importing the package registers the paper's backbones (`resnet8`, `resnet20` ... `resnet1202`)
in timm.

Example:
    >>> import timm, earlyexit
    >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3, dist="pareto")
    >>> net.num_exits
    3
"""

from __future__ import annotations

__version__ = "0.1.0"

from earlyexit import models as _models  # noqa: F401  (registers the paper's models in timm)
from earlyexit.errors import (
    CheckpointError,
    EarlyExitError,
    EarlyExitWarning,
    PlacementError,
    TraceError,
)
from earlyexit.flops import Candidate, FlopProfile, profile
from earlyexit.heads import ExitHead
from earlyexit.loss import EENetLoss, eenet_loss
from earlyexit.model import EarlyExitConfig, EarlyExitNet, convert
from earlyexit.outputs import EarlyExitResult, ExitOutputs
from earlyexit.placement import DISTRIBUTIONS, distribution_targets

__all__ = [
    "DISTRIBUTIONS",
    "Candidate",
    "CheckpointError",
    "EENetLoss",
    "EarlyExitConfig",
    "EarlyExitError",
    "EarlyExitNet",
    "EarlyExitResult",
    "EarlyExitWarning",
    "ExitHead",
    "ExitOutputs",
    "FlopProfile",
    "PlacementError",
    "TraceError",
    "__version__",
    "convert",
    "distribution_targets",
    "eenet_loss",
    "profile",
]
