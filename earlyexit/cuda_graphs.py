"""CUDA graphs for early-exit inference: each stage, with its exit, replayed as one graph.

`net.early_exit` launches every kernel of every stage from Python; on a GPU, small batches of
small images spend more time launching kernels than running them. Here each stage i, with exit
head i, the exit test `sigmoid(a_i) >= T` and the compaction of the batch, is captured once per
batch size as a CUDA graph and then replayed with one launch.

Two layers:

- The steps (`_Steps`): stage i at batch size b, run on static buffers: one input buffer per
  stage, and T and the number of real rows as 0-d tensors on the device. A step reads only
  those and writes its results to fixed places (the samples that stay, first, into the next
  stage's buffer), which is what a graph needs. `_Steps` runs the steps eagerly, on any device
  (the CPU tests use it); `_GraphSteps` captures each one as a CUDA graph and replays it.
- The padding (`GraphedEarlyExit`): n samples go into the first n rows of the smallest
  captured batch size b >= n; rows n..b-1 hold whatever an earlier batch left there and are
  sorted behind every real row, then ignored. Layers in eval mode treat each sample on its
  own, so padding never changes a real sample's result.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from earlyexit._head_folding import InferenceHead
from earlyexit.errors import EarlyExitError
from earlyexit.fx._fold import folded_pairs
from earlyexit.inference import ExitSplit, _select, check_threshold, exit_mask, record_exit
from earlyexit.model import EarlyExitNet, check_eval_net
from earlyexit.outputs import EarlyExitResult

__all__ = ["CudaGraphError", "GraphedEarlyExit", "bucket_sizes", "capture_cuda_graphs"]

#: Eager runs of each step before it is captured, as in `torch.cuda.make_graphed_callables`:
#: cuDNN's algorithm search and other lazy set-up must not end up in a graph.
WARMUP_RUNS = 3

# BatchNorm layers that normalise with the batch's own statistics when they have no running ones.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class CudaGraphError(EarlyExitError, RuntimeError):
    """A net cannot run as CUDA graphs: no CUDA device, or a stage that cannot be captured."""


def bucket_sizes(batch_sizes: int | Sequence[int]) -> tuple[int, ...]:
    """The batch sizes to capture, ascending.

    Args:
        batch_sizes: an int B for the powers of two below B and B itself (so a batch is padded
            to less than twice its size), or the sizes themselves.

    Returns:
        The sizes, ascending, without repeats.

    Raises:
        TypeError: a size is not an int.
        ValueError: no sizes, or a size below 1.
    """
    expected = (
        f"Expected `batch_sizes` to be a positive int or a sequence of them, got {batch_sizes!r}."
    )
    sizes = [batch_sizes] if not isinstance(batch_sizes, Sequence) else list(batch_sizes)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(expected)
        if size < 1:
            raise ValueError(expected)
    if not sizes:
        raise ValueError("Expected `batch_sizes` to hold at least one batch size, got none.")
    if isinstance(batch_sizes, int):
        sizes = [2**k for k in range(batch_sizes.bit_length()) if 2**k < batch_sizes]
        sizes.append(batch_sizes)
    return tuple(sorted(set(sizes)))


def _bucket(sizes: tuple[int, ...], n: int) -> int:
    """The smallest of `sizes` (ascending) that holds `n` rows."""
    return sizes[bisect.bisect_left(sizes, n)]


def _check_net(net: EarlyExitNet) -> None:
    """Refuse what padding or fixed graphs would get wrong."""
    check_eval_net(net, "the graphs run the eval-mode stages")
    if net._compiled_heads is not None:
        raise CudaGraphError(
            "The net was compiled (`net.compile()`); its CUDA graphs capture the stages and "
            "heads as written, and capturing compiled ones is not supported. Hint: capture a "
            "net that is not compiled (convert or load it again), or use the compiled net "
            "without CUDA graphs (`torch.compile`'s mode='reduce-overhead' makes graphs of "
            "its own)."
        )
    for name, module in net.named_modules():
        if isinstance(module, _BATCH_NORMS) and module.running_mean is None:
            raise CudaGraphError(
                f"`{name}` is a {type(module).__name__} without running statistics: in eval "
                "mode it normalises with the batch's own, so padding a batch would change the "
                "results. Hint: use `net.early_exit` without CUDA graphs."
            )


def _memory_format(net: EarlyExitNet, ndim: int) -> torch.memory_format:
    """channels_last for a 4-d input where the net's first 4-d weight is in that layout."""
    if ndim == 4:
        for param in net.parameters():
            if param.ndim == 4:
                if not param.is_contiguous() and param.is_contiguous(
                    memory_format=torch.channels_last
                ):
                    return torch.channels_last
                break
    return torch.contiguous_format


class _Watch:
    """Every parameter and buffer of a net, as its graphs were captured: a cheap check at each
    call of whether one changed.

    A graph reads tensors where they were at capture. A change made in place
    (`load_state_dict`, an optimizer's step, `copy_`) bumps a version counter, and the folded
    weights are made again; a tensor replaced by one elsewhere in memory (`.to()`, `.half()`,
    `.data = ...`, `load_state_dict(assign=True)`) would leave a graph reading freed memory.
    Reading the counters and addresses of the tensors listed once costs a third of asking
    every folded pair whether it must fold again (0.14 against 0.33 ms for ResNet-110's
    109 pairs and 10 heads on a CPU core).
    """

    def __init__(self, net: nn.Module) -> None:
        self.slots: list[tuple[dict, str]] = []
        seen: set[tuple[int, str]] = set()
        for module in net.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None and (id(table), name) not in seen:
                        seen.add((id(table), name))
                        self.slots.append((table, name))
        self.norms = [m for m in net.modules() if isinstance(m, _BATCH_NORMS)]
        self.addresses = self._addresses(self.tensors())
        self.seen: list | None = None  # `state` after the last full refresh

    def tensors(self) -> list[torch.Tensor | None]:
        return [table.get(name) for table, name in self.slots]

    @staticmethod
    def _addresses(tensors: list[torch.Tensor | None]) -> list[int | None]:
        return [None if t is None else t.data_ptr() for t in tensors]

    def moved(self, tensors: list[torch.Tensor | None]) -> bool:
        """Whether a tensor is gone or in other memory than at capture."""
        return self._addresses(tensors) != self.addresses

    def state(self, tensors: list[torch.Tensor | None]) -> list | None:
        """The version counters and the norms' eps, or None where a counter cannot be read
        (inference tensors have none)."""
        try:
            return [t._version for t in tensors] + [m.eps for m in self.norms]  # type: ignore[union-attr]
        except RuntimeError:
            return None


def _require_cuda(net: EarlyExitNet) -> torch.device:
    device = next(net.parameters()).device
    if device.type != "cuda":
        raise CudaGraphError(
            f"CUDA graphs need a CUDA device; the net is on {device}. Hint: net.cuda(), or "
            "use `net.early_exit` / `earlyexit.predict` without CUDA graphs."
        )
    return device


class _Steps:
    """Stage i, with exit head i, the exit test and the compaction, at batch size b.

    Stage i reads its input from `inputs[i]`, one buffer at the largest batch size whose first
    b rows are batch size b's input; T (`threshold`) and the number of real rows (`count`) are
    0-d tensors. A step writes the samples that stay, first and in order, into the next
    stage's buffer and returns the rest at fixed places, so that a CUDA graph of it can be
    replayed. This class runs the steps eagerly; `_GraphSteps` replays them.
    """

    def __init__(self, net: EarlyExitNet, batch_sizes: tuple[int, ...]) -> None:
        self.stages = net.staged.inference_stages()
        self.heads = net._inference_heads()  # folded, as `early_exit` runs them
        self.batch_sizes = batch_sizes
        # A graph reads the folded weights it was captured with; `refresh` folds them again
        # (in the same tensors) where the net's weights changed since.
        self.folded = folded_pairs(self.stages)
        self.folded_heads = [h for h in self.heads if isinstance(h, InferenceHead)]
        param = next(net.parameters())
        # Ordinary tensors, though `predict` builds the steps under inference mode: the caller
        # writes into them, in whatever mode it runs.
        with torch.inference_mode(False), torch.no_grad():
            self.threshold = torch.tensor(net.threshold, dtype=torch.float32, device=param.device)
            self.threshold_value = net.threshold
            self.count = torch.zeros((), dtype=torch.long, device=param.device)
            size = (max(batch_sizes), *net.input_size)
            # In the layout the convolutions run in: a batch in another one would be converted
            # inside the first graph, every replay.
            self.inputs = [
                torch.zeros(size, dtype=param.dtype, device=param.device).contiguous(
                    memory_format=_memory_format(net, len(size))
                )
            ]
            # The largest batch first: captured graphs share one memory pool, and the smaller
            # ones then fit in what the larger ones have freed.
            for b in reversed(batch_sizes):
                for i in range(len(self.stages)):
                    if i < len(self.heads) and i + 1 == len(self.inputs):
                        self.inputs.append(torch.zeros_like(self.stages[i](self.inputs[i])))
                    self._prepare(i, b)

    def invalidated(self) -> bool:
        """Whether a folded pair or head was told to fold again (`net.train()` does)."""
        return any(pair.invalidated() for pair in self.folded) or any(
            head.invalidated() for head in self.folded_heads
        )

    def refresh(self) -> None:
        """Fold the batch norms (and the heads) again where a weight or statistic changed
        since the last run."""
        for module in self.folded:
            key = module.source_key()
            if key is not None:
                module.folded(key)
        for head in self.folded_heads:
            head.refresh()

    def set_threshold(self, threshold: float) -> None:
        if threshold != self.threshold_value:
            self.threshold.fill_(threshold)
            self.threshold_value = threshold

    def _step(self, i: int, b: int) -> tuple[torch.Tensor, ...]:
        """Run step (i, b): `(logits,)` for the final stage; else the exit's class logits,
        the order of the rows (stayers, leavers, padding) and the number of stayers."""
        x = self.inputs[i][:b]
        y = self.stages[i](x)
        if i == len(self.heads):
            return (y,)
        logits, confidence = self.heads[i](y)
        real = torch.arange(b, device=x.device) < self.count
        # 0: stays, 1: leaves, 2: padding; a stable sort keeps each group in input order.
        leave = exit_mask(confidence, self.threshold)  # type: ignore[arg-type]
        key = torch.where(real, leave.to(torch.int8), 2)
        order = torch.argsort(key, stable=True)
        self.inputs[i + 1][:b].copy_(_select(y, order))
        return logits.index_select(0, order), order, (key == 0).sum()

    def _prepare(self, i: int, b: int) -> None:
        """Get step (i, b) ready to run: nothing to do when it runs eagerly."""

    def run(self, i: int, b: int) -> tuple[torch.Tensor, ...]:
        """Run step (i, b); its outputs are valid until the next step runs."""
        return self._step(i, b)

    def read(self, count: torch.Tensor) -> int:
        """A 0-d count on the host."""
        return int(count)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage collection until the block ends (what is garbage is collected later)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _GraphSteps(_Steps):
    """The steps as CUDA graphs: each warmed up and captured once, in one memory pool."""

    def __init__(self, net: EarlyExitNet, batch_sizes: tuple[int, ...]) -> None:
        self.device = next(net.parameters()).device
        self.exit_names = net.exit_names
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # One stream for every warm-up and capture, as `make_graphed_callables` does.
        self.stream = torch.cuda.Stream(self.device)
        # The count of stayers comes back through pinned memory; the host waits on an event.
        with torch.inference_mode(False):
            self.host_count = torch.zeros((), dtype=torch.long, pin_memory=True)
        self.copied = torch.cuda.Event()
        super().__init__(net, batch_sizes)

    def _prepare(self, i: int, b: int) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            # The outer context also gives the caller its stream back when a capture fails.
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_RUNS):
                    self._step(i, b)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA call (a DataLoader's pin-memory thread
                # allocating pinned memory) must not invalidate this capture. No garbage
                # collection during it: one could free another graph mid-capture (PyTorch
                # no longer collects when a capture starts).
                with (
                    _no_gc(),
                    torch.cuda.graph(
                        graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
                    ),
                ):
                    outputs = self._step(i, b)
        except Exception as err:  # the stage's own error, or the capture's
            if i < len(self.heads):
                what = f"Stage {i} with exit head {i} (at `{self.exit_names[i]}`)"
            else:
                what = f"Stage {i} (the final stage)"
            first_line = (str(err).strip().splitlines() or [""])[0].rstrip(".")
            raise CudaGraphError(
                f"{what} cannot be captured in a CUDA graph at batch size {b}: "
                f"{type(err).__name__}: {first_line}. Hint: a stage that reads values back to "
                "the host (`.item()`, `.tolist()`, boolean-mask indexing), copies to the CPU or "
                "synchronises cannot be captured; use `net.early_exit` without CUDA graphs."
            ) from err
        current.wait_stream(self.stream)
        self.graphs[i, b] = graph
        self.outputs[i, b] = outputs

    def run(self, i: int, b: int) -> tuple[torch.Tensor, ...]:
        self.graphs[i, b].replay()
        return self.outputs[i, b]

    def read(self, count: torch.Tensor) -> int:
        self.host_count.copy_(count, non_blocking=True)
        self.copied.record(torch.cuda.current_stream(self.device))
        self.copied.synchronize()
        return int(self.host_count)


class _Exit(NamedTuple):
    """One exit's verdict on the rows of a step: `n_stay` stayers now fill the next buffer."""

    leave: torch.Tensor
    logits: torch.Tensor
    stay: torch.Tensor
    n_stay: int


class GraphedEarlyExit:
    """`net.early_exit` replayed from CUDA graphs captured at fixed batch sizes.

    Build one with `earlyexit.capture_cuda_graphs`. Each call pads the batch (and, after each
    exit, the samples that stay) to the smallest captured batch size that holds it; a batch
    larger than the largest one runs in slices of that size. Per sample, the result is what
    `net.early_exit` gives it.

    The graphs read the net's parameters and buffers in place: weights loaded with
    `load_state_dict` are used (each call first folds the batch norms again, into the tensors
    the graphs read, where a weight or statistic changed), but after moving or converting the
    net (`.to()`, `.half()`) or replacing one of its tensors or modules, capture again (a
    call refuses moved tensors; see `_Watch`). The threshold is `net.threshold`, or the one passed
    to a call; changing it needs no new capture.

    Attributes:
        net: the net the graphs were captured from.
        batch_sizes: the captured batch sizes, ascending.
    """

    def __init__(self, net: EarlyExitNet, steps: _Steps) -> None:
        self.net = net
        self.batch_sizes = steps.batch_sizes
        self._steps = steps
        self._watch = _Watch(net)

    def __call__(self, x: torch.Tensor, threshold: float | None = None) -> EarlyExitResult:
        """Same as `early_exit`."""
        return self.early_exit(x, threshold)

    def early_exit(self, x: torch.Tensor, threshold: float | None = None) -> EarlyExitResult:
        """Early-exit inference: each sample stops at the first exit with h_i >= threshold.

        Args:
            x: the input batch, `(B, *net.input_size)`, any batch size.
            threshold: T for this call; `net.threshold` when None.

        Returns:
            `EarlyExitResult(logits, exit_index, cost)` on the net's device, as
            `net.early_exit` returns it.

        Raises:
            ValueError: the net is in train mode, or `x` is not at `net.input_size`.
            CudaGraphError: the net's parameters moved since the capture.
        """
        net = self.net
        self._prepare()
        if tuple(x.shape[1:]) != net.input_size:
            raise ValueError(
                f"Expected `x` of shape (B, {', '.join(map(str, net.input_size))}) "
                f"(`net.input_size`), got {tuple(x.shape)}. Hint: the graphs are captured at "
                "the size the net was converted at."
            )
        t = net.threshold if threshold is None else check_threshold(threshold)
        self._steps.set_threshold(t)
        with torch.no_grad():
            return self._early_exit(x)

    def _prepare(self) -> None:
        """Check that the graphs can run the net as it is now, and fold changed weights again.

        Raises:
            ValueError: the net is in train mode.
            CudaGraphError: the net's parameters moved since the capture.
        """
        if self.net.training:
            raise ValueError(
                "Expected `net` in eval mode, got it in train mode (the graphs run the "
                "eval-mode stages). Hint: call `net.eval()` first."
            )
        watch = self._watch
        tensors = watch.tensors()
        if watch.moved(tensors):
            raise CudaGraphError(
                "The net's parameters moved (`.to()`, `.cuda()`, `.half()`, a tensor replaced) "
                "since its CUDA graphs were captured; the graphs would read the old memory. "
                "Hint: capture again with `earlyexit.capture_cuda_graphs`."
            )
        state = watch.state(tensors)
        if state is None or state != watch.seen or self._steps.invalidated():
            with torch.no_grad():
                self._steps.refresh()
            watch.seen = state

    def _early_exit(self, x: torch.Tensor) -> EarlyExitResult:
        n_exits = len(self._steps.heads)
        batch = x.shape[0]
        device = self._steps.count.device
        exit_index = torch.full((batch,), n_exits, dtype=torch.long, device=device)
        logits: torch.Tensor | None = None
        largest = self.batch_sizes[-1]
        for start in range(0, batch, largest):
            n = min(largest, batch - start)
            self._load(0, x[start : start + n])
            ids = torch.arange(start, start + n, device=device)
            for i in range(n_exits):
                split = self._exit(i, n, ids)
                logits = record_exit(logits, exit_index, split.leave, split.logits, i)
                ids, n = split.stay, split.n_stay
                if n == 0:
                    break
            if n:
                assert logits is not None
                logits.index_copy_(0, ids, self._final(n).to(logits.dtype))
        if logits is None:  # an empty batch
            logits = torch.empty((0, self.net.num_classes), dtype=x.dtype, device=device)
        return EarlyExitResult(logits, exit_index, self.net.exit_costs.to(device)[exit_index])

    def _load(self, i: int, x: torch.Tensor) -> None:
        """Put `x` into the first rows of stage i's input buffer."""
        self._steps.inputs[i][: x.shape[0]].copy_(x)

    def _exit(self, i: int, n: int, ids: torch.Tensor) -> _Exit:
        """Run stage i and its exit on the first `n` rows of its buffer, named `ids`."""
        steps = self._steps
        steps.count.fill_(n)
        logits, order, n_stay = steps.run(i, _bucket(self.batch_sizes, n))
        ids = ids.index_select(0, order[:n])  # stayers first, then leavers
        stay = steps.read(n_stay)  # the one host synchronisation of this exit
        return _Exit(ids[stay:], logits[stay:n], ids[:stay], stay)

    def _final(self, n: int) -> torch.Tensor:
        """The final stage's logits for the first `n` rows of its buffer."""
        (logits,) = self._steps.run(len(self._steps.heads), _bucket(self.batch_sizes, n))
        return logits[:n]

    def _run_exit(self, i: int, x: torch.Tensor, ids: torch.Tensor, threshold: float) -> ExitSplit:
        """`inference.run_exit` for stage i, from the graphs (for `predict`'s pipeline).

        The logits and features are copies: the next step overwrites the graphs' own.
        """
        self._steps.set_threshold(threshold)
        self._load(i, x)
        split = self._exit(i, x.shape[0], ids)
        features = self._steps.inputs[i + 1][: split.n_stay].clone()
        return ExitSplit(split.leave, split.logits.clone(), split.stay, features)

    def _run_final(self, x: torch.Tensor) -> torch.Tensor:
        """The final stage's logits for `x`, a copy."""
        self._load(len(self._steps.heads), x)
        return self._final(x.shape[0]).clone()

    def __repr__(self) -> str:
        return (
            f"GraphedEarlyExit(num_exits={self.net.num_exits}, "
            f"batch_sizes={list(self.batch_sizes)}, steps={type(self._steps).__name__})"
        )


def _eager(net: EarlyExitNet, batch_sizes: int | Sequence[int]) -> GraphedEarlyExit:
    """The same padding around the same steps, run eagerly on any device (for tests)."""
    sizes = bucket_sizes(batch_sizes)
    _check_net(net)
    return GraphedEarlyExit(net, _Steps(net, sizes))


def capture_cuda_graphs(net: EarlyExitNet, batch_sizes: int | Sequence[int]) -> GraphedEarlyExit:
    """Capture each stage of `net`, with its exit, as CUDA graphs for early-exit inference.

    For every stage i and batch size b, one graph runs stage i, exit head i, the exit test
    `sigmoid(a_i) >= T` and the compaction of the batch (the samples that stay go first into
    the next stage's input buffer). Each step is warmed up on a side stream, then captured, the
    largest batch size first, all in one memory pool. At inference a batch is padded to the
    smallest captured size that holds it, so a sample's result does not depend on the padding;
    the host reads one number per exit (how many samples stay), through pinned memory.

    Capture under the autocast settings you will run with (and `cache_enabled=False`): the
    graphs replay what was captured.

    Args:
        net: the early-exit net, in eval mode, on a CUDA device.
        batch_sizes: the batch sizes to capture: an int B for the powers of two below B and B
            itself (a batch larger than B runs in slices of B), or the sizes themselves. For
            `earlyexit.predict`, `cuda_graphs=True` captures just its `batch_size`.

    Returns:
        A `GraphedEarlyExit`, called like `net.early_exit`.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`, or a batch size is not an int.
        ValueError: the net is in train mode, a batch size is below 1, or autocast caches casts.
        CudaGraphError: (an `EarlyExitError` and a `RuntimeError`) the net is not on a CUDA
            device, was compiled (`net.compile()`), has a BatchNorm that uses batch
            statistics (padding would change results), or has a stage that cannot be
            captured (the message names it).

    Example:
        >>> import timm, torch, earlyexit
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
        >>> net = net.cuda()  # doctest: +SKIP
        >>> graphed = earlyexit.capture_cuda_graphs(net, batch_sizes=64)  # doctest: +SKIP
        >>> graphed.batch_sizes  # doctest: +SKIP
        (1, 2, 4, 8, 16, 32, 64)
        >>> result = graphed(torch.randn(37, 3, 32, 32, device="cuda"))  # doctest: +SKIP
    """
    sizes = bucket_sizes(batch_sizes)
    _check_net(net)
    device = _require_cuda(net)
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        raise ValueError(
            "Expected autocast without its cast cache while capturing CUDA graphs: cached "
            "casts are freed when the autocast region ends. Hint: "
            '`torch.autocast("cuda", dtype=..., cache_enabled=False)`.'
        )
    with torch.cuda.device(device):
        steps = _GraphSteps(net, sizes)
    return GraphedEarlyExit(net, steps)
