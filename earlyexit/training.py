"""Training helpers: the loop every EENet user would otherwise write.

- `freeze_backbone` trains only the exits of a net built on a pretrained model.
- `param_groups` gives optimizer groups: a separate backbone learning rate, no weight decay on
  norms and biases.
- `train_one_epoch` runs one epoch with a progress bar and stops on a NaN or infinite loss.

The evaluator (`evaluate`, `Evaluation`, `select_exits`, `collect_exit_cache`,
`sweep_thresholds`, `ExitCache`, `NEVER`) lives in `earlyexit.evaluation`; it is importable from
here too, where it used to be.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from earlyexit.errors import EarlyExitError
from earlyexit.evaluation import (
    NEVER,
    Evaluation,
    ExitCache,
    _resolve_device,
    _total,
    _unpack,
    collect_exit_cache,
    evaluate,
    select_exits,
    sweep_thresholds,
)
from earlyexit.model import EarlyExitNet

__all__ = [
    "NEVER",
    "Evaluation",
    "ExitCache",
    "collect_exit_cache",
    "evaluate",
    "freeze_backbone",
    "param_groups",
    "select_exits",
    "sweep_thresholds",
    "train_one_epoch",
]

# Set on a net by `freeze_backbone`: the hooks that keep the backbone's norm layers in eval mode.
_FROZEN_HOOKS = "_earlyexit_frozen_norm_hooks"


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def freeze_backbone(net: EarlyExitNet, freeze: bool = True) -> EarlyExitNet:
    """Train only the exit heads: freeze (or unfreeze) every parameter of the backbone.

    For a net converted from a pretrained model: the backbone, its own classifier (the final
    exit) included, keeps its weights, and only the early exits learn. The backbone's
    normalization layers also keep their running statistics and normalize with them, even in
    train mode, so the exits train on exactly the features they will see at inference.

    Args:
        net: the early-exit net.
        freeze: `True` to freeze, `False` to undo an earlier freeze.

    Returns:
        The same net, for chaining.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`.

    Example:
        >>> import timm, earlyexit
        >>> from earlyexit.training import freeze_backbone
        >>> net = freeze_backbone(earlyexit.convert(timm.create_model("resnet20"), n_exits=2))
        >>> any(p.requires_grad for p in net.backbone.parameters())
        False
        >>> all(p.requires_grad for p in net.heads.parameters())
        True
    """
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    net.backbone.requires_grad_(not freeze)
    for handle in getattr(net, _FROZEN_HOOKS, []):
        handle.remove()
    hooks = []
    for module in net.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            if freeze:
                hooks.append(module.register_forward_pre_hook(_keep_eval))
                module.train(False)
            else:
                module.train(net.training)
    setattr(net, _FROZEN_HOOKS, hooks)
    return net


def param_groups(
    net: nn.Module,
    lr: float,
    backbone_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: backbone and exits apart, norms and biases without decay.

    Parameters that don't require grad (a frozen backbone) are left out. One-dimensional
    parameters (biases and the weights of normalization layers) get no weight decay. Each group
    carries a `"name"`: `backbone`, `backbone_no_decay`, `exits`, `exits_no_decay` (empty groups
    are dropped). For a model that is not an `EarlyExitNet`, every parameter counts as an exit's.

    Args:
        net: the early-exit net (or any module).
        lr: learning rate of the exit heads (and of the backbone when `backbone_lr` is None).
        backbone_lr: learning rate of the backbone, its own classifier included; smaller than
            `lr` when fine-tuning a pretrained model.
        weight_decay: weight decay of the multi-dimensional weights.

    Returns:
        A list of dicts for `torch.optim` optimizers.

    Raises:
        ValueError: a negative or non-finite learning rate or weight decay.

    Example:
        >>> import timm, torch, earlyexit
        >>> from earlyexit.training import param_groups
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
        >>> groups = param_groups(net, lr=0.1, backbone_lr=0.01, weight_decay=1e-4)
        >>> for g in groups:
        ...     print(g["name"], g["lr"], g["weight_decay"])
        backbone 0.01 0.0001
        backbone_no_decay 0.01 0.0
        exits 0.1 0.0001
        exits_no_decay 0.1 0.0
        >>> optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    for name, value in (("lr", lr), ("backbone_lr", backbone_lr), ("weight_decay", weight_decay)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `{name}` to be a float, got {type(value).__name__}.")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Expected `{name}` to be a non-negative float, got {value!r}.")
    backbone = net.backbone if isinstance(net, EarlyExitNet) else None
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    buckets: dict[str, list[nn.Parameter]] = {
        "backbone": [],
        "backbone_no_decay": [],
        "exits": [],
        "exits_no_decay": [],
    }
    for p in net.parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if id(p) in backbone_ids else "exits"
        buckets[part if p.ndim > 1 else f"{part}_no_decay"].append(p)
    lrs = {"backbone": lr if backbone_lr is None else backbone_lr, "exits": lr}
    return [
        {
            "name": name,
            "params": params,
            "lr": lrs[name.removesuffix("_no_decay")],
            "weight_decay": 0.0 if name.endswith("_no_decay") else weight_decay,
        }
        for name, params in buckets.items()
        if params
    ]


def train_one_epoch(
    net: nn.Module,
    loader: Iterable[Any],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    epoch: int | None = None,
    progress: bool = True,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Train for one pass over `loader` and return the mean loss per sample.

    The net is put in train mode; each batch is moved to `device`, run, scored with
    `criterion(net(x), y)` and stepped. This works for an `EarlyExitNet` with `EENetLoss` as
    for a plain classifier with `nn.CrossEntropyLoss`.

    Args:
        net: the model to train.
        loader: yields `(inputs, targets)` batches (extra items are ignored).
        criterion: maps `(net(x), y)` to a scalar loss.
        optimizer: steps the net's parameters.
        device: where to run; the device of the net's parameters when None.
        epoch: shown in the progress bar and in errors.
        progress: show a tqdm progress bar.
        scaler: a `torch.amp.GradScaler` for mixed precision; the forward pass then runs under
            `torch.autocast` on the device.

    Returns:
        The mean of the batch losses, weighted by batch size.

    Raises:
        EarlyExitError: a loss is NaN or infinite; the message names the epoch and the step.
        TypeError: the loader yields something other than `(inputs, targets)`.

    Example:
        >>> import timm, torch, earlyexit
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from earlyexit.training import train_one_epoch
        >>> _ = torch.manual_seed(0)
        >>> net = earlyexit.convert(timm.create_model("resnet8", width=2), n_exits=2)
        >>> data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
        >>> optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> loss = train_one_epoch(net, DataLoader(data, batch_size=16), earlyexit.EENetLoss(),
        ...                        optimizer, progress=False)
        >>> loss > 0
        True
    """
    device = _resolve_device(net, device)
    net.train()
    where = "" if epoch is None else f"epoch {epoch}, "
    desc = "train" if epoch is None else f"epoch {epoch}"
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    bar = tqdm(loader, desc=desc, total=_total(loader), disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        x, y = _unpack(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=scaler is not None):
            outputs = net(x)
        loss = criterion(outputs, y)
        value = float(loss.detach())  # one host sync per step: catches a NaN at its step
        if not math.isfinite(value):
            raise EarlyExitError(
                f"The loss is {value} at {where}step {step} (batch of {x.shape[0]}). Hint: "
                "lower the learning rate, check the inputs for NaN, or clip gradients; with "
                "mixed precision, try float32."
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += value * x.shape[0]
        samples += x.shape[0]
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    bar.close()
    return float(total_loss) / max(samples, 1)
