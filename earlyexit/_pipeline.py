"""Per-stage refill queues: every stage runs at a full batch however many samples leave early.

`predict` feeds a stream of input batches through a `Pipeline`; `early_exit` on the CPU feeds
one large batch through one in micro-batches (`run_micro_batches`). The samples that stay
after exit i wait in queue i+1 until a full batch is there, and the queues are flushed
(partial batches) at the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from earlyexit.errors import EarlyExitError
from earlyexit.inference import run_exit
from earlyexit.outputs import EarlyExitResult

if TYPE_CHECKING:
    from earlyexit.cuda_graphs import GraphedEarlyExit

__all__ = ["Pipeline", "Queue", "run_micro_batches"]


class Queue:
    """The samples waiting for one stage: chunks of inputs with their ids, oldest first."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.size = 0
        self.peak = 0  # the most samples it ever held

    def put(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        if ids.numel():
            self.chunks.append((x, ids))
            self.size += ids.numel()
            self.peak = max(self.peak, self.size)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `n` oldest samples, in one batch."""
        xs, ids = [], []
        while n > 0:
            x, i = self.chunks.popleft()
            if i.numel() > n:
                self.chunks.appendleft((x[n:], i[n:]))
                x, i = x[:n], i[:n]
            xs.append(x)
            ids.append(i)
            n -= i.numel()
            self.size -= i.numel()
        if len(xs) == 1:
            return xs[0], ids[0]
        return torch.cat(xs), torch.cat(ids)


class Pipeline:
    """One queue per stage; finished samples are gathered on the CPU.

    The deepest stage whose queue holds a full batch runs first, so no queue after the first
    ever holds two batches; `flush` then runs the partial batches, from shallow to deep.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        threshold: float,
        batch_size: int,
        graphs: GraphedEarlyExit | None = None,
    ) -> None:
        self.stages, self.heads = stages, heads
        self.graphs = graphs  # CUDA graphs captured at `batch_size`; None: the eager stages
        self.threshold = threshold
        self.batch_size = batch_size
        self.queues = [Queue() for _ in stages]
        self.done: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # ids, logits, exit
        self.dtype: torch.dtype | None = None  # of exit 0's logits, as in `early_exit`
        # The CUDA streams that copies of results to the host were queued on, not yet waited for.
        self.copying: set[torch.cuda.Stream] = set()

    def push(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Queue new inputs for stage 0 and run every stage that has a full batch."""
        self.queues[0].put(x, ids)
        self._drain(flush=False)

    def flush(self) -> None:
        """Run everything that is still queued."""
        self._drain(flush=True)

    def _drain(self, flush: bool) -> None:
        while True:
            sizes = [q.size for q in self.queues]
            full = [i for i, size in enumerate(sizes) if size >= self.batch_size]
            waiting = [i for i, size in enumerate(sizes) if size]
            if full:
                self._run(full[-1], self.batch_size)
            elif flush and waiting:
                self._run(waiting[0], sizes[waiting[0]])
            else:
                return

    def _run(self, i: int, n: int) -> None:
        x, ids = self.queues[i].take(n)
        if i == len(self.heads):
            final = self.stages[i] if self.graphs is None else self.graphs._run_final
            self._finish(ids, final(x), i)
            return
        if self.graphs is None:
            split = run_exit(self.stages[i], self.heads[i], x, ids, self.threshold)
        else:  # a partial batch is padded to `batch_size`
            split = self.graphs._run_exit(i, x, ids, self.threshold)
        if self.dtype is None:
            self.dtype = split.logits.dtype
        self._finish(split.leave, split.logits, i)
        self.queues[i + 1].put(split.features, split.stay)

    def _finish(self, ids: torch.Tensor, logits: torch.Tensor, exit_index: int) -> None:
        if ids.numel():
            self.done.append((self._to_host(ids), self._to_host(logits), exit_index))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the CPU. From a GPU, into pinned memory without waiting (a wait at every exit
        would leave the GPU idle while the host catches up); `result` waits once for all of
        them, on the stream each copy was queued on."""
        if not t.is_cuda:
            return t.cpu()
        self.copying.add(torch.cuda.current_stream(t.device))
        return t.to("cpu", non_blocking=True)

    def _wait_for_copies(self) -> None:
        """Wait until the copies `_to_host` started have landed (no other work is waited for)."""
        for stream in self.copying:
            copied = torch.cuda.Event()
            copied.record(stream)
            copied.synchronize()
        self.copying.clear()

    def result(self, count: int, costs: torch.Tensor, num_classes: int) -> EarlyExitResult:
        """The results of samples `0 .. count-1`, in that order, on the CPU."""
        costs = self._to_host(costs)  # a buffer of the net: on its device
        self._wait_for_copies()
        logits = torch.empty((count, num_classes), dtype=self.dtype or torch.get_default_dtype())
        exit_index = torch.empty(count, dtype=torch.long)
        finished = sum(ids.numel() for ids, _, _ in self.done)
        if finished != count:  # never hand out partial results as if they were complete
            raise EarlyExitError(f"Internal error: {finished} of {count} samples finished.")
        if self.done:
            chunks, parts, exits = zip(*self.done)
            ids = torch.cat(chunks)
            logits.index_copy_(0, ids, torch.cat([z.to(logits.dtype) for z in parts]))
            indices = [torch.full((z.shape[0],), i) for z, i in zip(parts, exits)]
            exit_index.index_copy_(0, ids, torch.cat(indices))
        return EarlyExitResult(logits, exit_index, costs[exit_index])


def run_micro_batches(
    stages: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    x: torch.Tensor,
    threshold: float,
    micro_batch: int,
    costs: torch.Tensor,
    num_classes: int,
) -> EarlyExitResult:
    """`run_early_exit` on a CPU batch, with every stage run on `micro_batch` samples at a time.

    The batch is the stream: stage 0 takes it `micro_batch` samples at a time, and the samples
    that stay wait for the next stage until `micro_batch` of them are there, so the late
    stages run on full micro-batches too. Each sample's result is the one it gets alone.

    Args:
        stages: N+1 stages; stage N ends with the model's own classifier.
        heads: N exit heads, head i on stage i's output.
        x: the input batch, on the CPU.
        threshold: T; a sample leaves at exit i when sigmoid(a_i) >= T.
        micro_batch: the most samples a stage runs at a time.
        costs: the N+1 relative costs.
        num_classes: the number of classes.

    Returns:
        Per sample: the logits of the exit it left at, that exit's index and its cost.
    """
    pipeline = Pipeline(stages, heads, threshold, micro_batch)
    pipeline.push(x, torch.arange(x.shape[0], device=x.device))
    pipeline.flush()
    return pipeline.result(x.shape[0], costs, num_classes)
