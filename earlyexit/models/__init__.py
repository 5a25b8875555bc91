"""The paper's backbones, registered in timm.

Importing this package (which `import earlyexit` does) registers `resnet20`, `resnet32`,
`resnet44`, `resnet56`, `resnet110` and `resnet1202` (the CIFAR ResNets of He et al. 2016) and
`resnet8` (the paper's small MNIST ResNet), so `timm.create_model("resnet110")` builds ours.
A name that another model already holds in timm's registry keeps that model: ours is not
registered under it, with an `EarlyExitWarning`.
"""

from __future__ import annotations

from earlyexit.models.cifar_resnet import BasicBlock, CifarResNet, ZeroPadShortcut
from earlyexit.models.mnist_resnet import MnistResNet, PreActBlock

__all__ = ["BasicBlock", "CifarResNet", "MnistResNet", "PreActBlock", "ZeroPadShortcut"]
