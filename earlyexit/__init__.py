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
from earlyexit.calibrate import TradeoffCurve, calibrate, plot_tradeoff, tradeoff_curve
from earlyexit.cuda_graphs import GraphedEarlyExit, capture_cuda_graphs
from earlyexit.errors import (
    CheckpointError,
    EarlyExitError,
    EarlyExitWarning,
    PlacementError,
    TraceError,
)
from earlyexit.evaluation import Evaluation, evaluate, select_exits
from earlyexit.export import ExportedEarlyExit, export_onnx, export_stages
from earlyexit.flops import Candidate, FlopProfile, profile
from earlyexit.heads import ExitHead
from earlyexit.io import load, save
from earlyexit.loss import EENetLoss, eenet_loss
from earlyexit.model import EarlyExitConfig, EarlyExitNet, convert
from earlyexit.outputs import EarlyExitResult, ExitOutputs
from earlyexit.placement import DISTRIBUTIONS, distribution_targets
from earlyexit.stream import Prediction, predict
from earlyexit.training import freeze_backbone, param_groups, train_one_epoch

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
    "Evaluation",
    "ExitHead",
    "ExitOutputs",
    "ExportedEarlyExit",
    "FlopProfile",
    "GraphedEarlyExit",
    "PlacementError",
    "Prediction",
    "TraceError",
    "TradeoffCurve",
    "__version__",
    "calibrate",
    "capture_cuda_graphs",
    "convert",
    "distribution_targets",
    "eenet_loss",
    "evaluate",
    "export_onnx",
    "export_stages",
    "freeze_backbone",
    "load",
    "param_groups",
    "plot_tradeoff",
    "predict",
    "profile",
    "save",
    "select_exits",
    "tradeoff_curve",
    "train_one_epoch",
]
