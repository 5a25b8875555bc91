"""Eval-mode stages whose convolution temporaries reuse one block of memory per call.

Inside a residual stage, the first convolution of each block makes a temporary that only the
block's second convolution reads: `t = relu(conv1(x))`, then `x = relu(conv2(t) + x)`. Each
block allocates `t` afresh, and with glibc's default malloc a freed block that large often
goes back to the OS and is page-faulted in again by the next one: on ResNet-110's 16-channel
stages at batch 256 (16 MiB per temporary), 10,000 to 40,000 page faults per pass, 10-15 % of
those stages' time, and a different number in every process.

`assign_workspaces` gives such temporaries slots of a `Workspace` that the stage makes when
it starts: the convolution writes into its slot (`FusedConv.slot`) instead of into fresh
memory, and the next temporary given that slot reuses the same block, faulted in once per
call. The workspace belongs to one call of the stage and is freed when the call returns, so
nothing is kept between calls and threads never share one.

A temporary gets a slot only where that cannot change a result: every op that reads it
(directly or through `nn.Identity` calls) is a convolution that makes a new tensor from it
(never writing into it or returning a view of it), it is not the stage's output, and every
reader has run before the slot is written again. Slots are dealt in graph order, each to
the first one free. With PyTorch 2.14's oneDNN the values are those of the convolutions
written into fresh memory, bit for bit; an older oneDNN (PyTorch 2.11's) may pick another
kernel for the in-place op, and the values then differ in their last bits.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from earlyexit.fx._fold import FoldedConvBN, free_name
from earlyexit.fx._pointwise import FusedConv

__all__ = ["Workspace", "assign_workspaces", "new_workspace"]

# Modules that read their one input and make a new tensor: safe readers of a slot's tensor.
_READERS: tuple[type[nn.Module], ...] = (nn.Conv2d, FoldedConvBN)


class Workspace:
    """The buffers of one call of a stage, one per slot, made at first use.

    `take(slot, shape, channels_last)` returns the slot's buffer: a float32 CPU tensor (what
    the fused convolutions write), made anew, uninitialised, when the slot holds none yet or
    one of another shape or layout.
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
        buffer = self._buffers.get(slot)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        if (
            buffer is None
            or tuple(buffer.shape) != tuple(shape)
            or not buffer.is_contiguous(memory_format=layout)
        ):
            buffer = torch.empty(shape, dtype=torch.float32, memory_format=layout)
            self._buffers[slot] = buffer
        return buffer


def new_workspace() -> Workspace:
    """A fresh `Workspace` (the node a rewritten stage starts with)."""
    return Workspace()


def _readers(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node] | None:
    """The ops that read `node`'s tensor, through `nn.Identity` calls (which return it as it
    is); None where one of them may do anything but read it to make a new tensor."""
    readers = []
    for user in node.users:
        if user.op != "call_module" or user.kwargs:
            return None
        module = gm.get_submodule(str(user.target))
        if type(module) is nn.Identity and user.args == (node,):
            further = _readers(user, gm)
            if not further:
                return None
            readers += further
        elif isinstance(module, FusedConv):
            # Its input, never the sum it may write into, nor its workspace.
            if user.args[0] is not node or node in user.args[1:]:
                return None
            readers.append(user)
        elif isinstance(module, _READERS) and user.args == (node,):
            readers.append(user)
        else:
            return None
    return readers


def assign_workspaces(gm: fx.GraphModule) -> int:
    """Let the ReLU-only fused convolutions of an eval-mode stage write into workspace slots
    wherever that is safe (see the module docstring), in place; the number given one.

    The caller recompiles `gm` when the count is not 0.
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    free_after: list[int] = []  # per slot: the position of its current tensor's last reader
    chosen: list[tuple[fx.Node, int]] = []
    for node in nodes:
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, FusedConv) or module.add or module.slot is not None:
            continue
        readers = _readers(node, gm)
        if not readers:
            continue
        last = max(order[u] for u in readers)
        slot = next((k for k, end in enumerate(free_after) if end < order[node]), None)
        if slot is None:
            slot = len(free_after)
            free_after.append(last)
        free_after[slot] = last
        chosen.append((node, slot))
    if not chosen:
        return 0
    first = next(n for n in nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        workspace = gm.graph.call_function(new_workspace)
    for node, slot in chosen:
        module = gm.get_submodule(str(node.target))
        name = free_name(gm, f"{node.target}_slot".replace(".", "_"))
        gm.add_submodule(name, module.writing_into_workspace(slot))
        node.target = name
        node.args = (node.args[0], workspace)
    return len(chosen)
