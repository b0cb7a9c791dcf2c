"""CUDA graphs of the factored recurrence: capture once per shape, then replay.

A step of the factored loop is ~10 small kernels; launched one by one from Python each costs
more than its arithmetic. Capturing all T steps of every layer as one ``torch.cuda.CUDAGraph``
for a given (batch, T, dtype, device, weights) and replaying it removes the launch overhead.
Inputs are copied into static buffers before each replay and outputs cloned after it, so the
caller never sees buffers that a later call overwrites. Only used on CUDA, without autograd;
nothing here runs (or needs CUDA) on a CPU-only machine.

    >>> graphs = Graphs(limit=4)
    >>> out = graphs.run(key, fn, (x, h0))  # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch
from torch import Tensor


# capture(fn, static inputs) -> (replay, static outputs): replay() recomputes the outputs in place.
Capture = Callable[[Callable[..., tuple], tuple], tuple]


class Graphs:
    """At most ``limit`` captured graphs, least recently used dropped first.

    ``capture`` is ``capture_cuda_graph`` on a GPU; tests pass an equivalent that runs on CPU.
    """

    def __init__(self, limit: int = 8, capture: Capture | None = None):
        self.limit = limit
        self.capture = capture or capture_cuda_graph
        self._entries: OrderedDict[Hashable, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def run(self, key: Hashable, fn: Callable[..., tuple], inputs: tuple[Tensor, ...], keep=None) -> tuple:
        """``fn(*inputs)`` by replaying the graph captured for ``key`` (capturing it first if new).

        ``fn`` must return a tuple of tensors (or None) and must not synchronise with the host.
        ``keep`` is held with the graph: the tensors its kernels read (prepared weights).
        """
        entry = self._entries.get(key)
        if entry is None:
            static_in = tuple(t.detach().clone() for t in inputs)
            replay, static_out = self.capture(fn, static_in)
            entry = (replay, static_in, static_out, keep)
            self._entries[key] = entry
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        replay, static_in, static_out, _ = entry
        for buffer, value in zip(static_in, inputs):
            buffer.copy_(value)
        replay()
        return tuple(None if t is None else t.clone() for t in static_out)


def capture_cuda_graph(fn: Callable[..., tuple], static_in: tuple) -> tuple:
    """Capture ``fn(*static_in)`` as a CUDA graph; returns (its replay, its static outputs)."""
    device = static_in[0].device
    # Warm up on a side stream (lazy cuBLAS initialisation must not be captured).
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)
    return graph.replay, static_out


def usable(x: Tensor) -> bool:
    """Whether a graph may be captured for this input now (CUDA, not already capturing)."""
    return x.is_cuda and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
