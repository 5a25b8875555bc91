"""Guessing which axis of a feature holds the channels, from the ops around it in the graph."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["channel_axis"]

_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CHANNELS_FIRST_FN = {
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    nn.functional.conv1d,
    nn.functional.conv2d,
    nn.functional.batch_norm,
    nn.functional.group_norm,
}
_CHANNELS_LAST_FN = {nn.functional.linear, nn.functional.layer_norm, torch.layer_norm}


def _layout_of(node: fx.Node, gm: fx.GraphModule, ndim: int) -> int | None:
    """The channel axis an op implies for its input, or None when it says nothing."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, _CHANNELS_FIRST):
            return 1
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)):
            return ndim - 1
    elif node.op == "call_function":
        if node.target in _CHANNELS_FIRST_FN:
            return 1
        if node.target in _CHANNELS_LAST_FN:
            return ndim - 1
    return None


def channel_axis(
    node: fx.Node, gm: fx.GraphModule, tensors: Mapping[fx.Node, TensorMetadata]
) -> int:
    """Find the channel axis of a feature from the ops that consume or produce it.

    Only ops that see the feature itself, or an elementwise function of it with the same
    shape, are asked: a permute or a reshape on the way says nothing about this layout.

    Args:
        node: the node whose output is the feature.
        gm: the graph it belongs to.
        tensors: the recorded metadata of the graph's tensors.

    Returns:
        The axis of the batched feature that holds the channels.
    """
    shape = tensors[node].shape
    ndim = len(shape)

    def same_shape(n: fx.Node) -> bool:
        meta = tensors.get(n)
        return meta is not None and meta.shape == shape

    seen, queue = {node}, deque([node])
    while queue:
        for user in queue.popleft().users:
            if user in seen:
                continue
            seen.add(user)
            axis = _layout_of(user, gm, ndim)
            if axis is not None:
                return axis
            if same_shape(user):
                queue.append(user)
    current: fx.Node | None = node
    while current is not None and same_shape(current):
        axis = _layout_of(current, gm, ndim)
        if axis is not None:
            return axis
        inputs = current.all_input_nodes
        current = inputs[0] if inputs else None
    # Nothing in the graph says: square spatial axes decide, then the usual convention.
    if ndim == 4 and shape[1] == shape[2] and shape[3] != shape[1]:
        return 3
    return 1 if ndim == 4 else ndim - 1
