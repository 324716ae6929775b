"""A network's inference call replayed from a CUDA graph, for the samplers' thousands of identical calls."""
from __future__ import annotations

import contextlib
import sys

import torch

WARMUP_CALLS = 2  # eager calls on a side stream before capturing: cuDNN autotuning and lazy initialisation happen there


class EagerReplay:
    """Stands in for a captured graph where there is none (CPU tests): replay() makes the call again, writing
    into the same output tensor, so the bookkeeping of `GraphedCall` runs exactly as it does on a GPU."""

    def __init__(self, call, inputs: list[torch.Tensor], output: torch.Tensor):
        self.call, self.inputs, self.output = call, inputs, output

    def replay(self):
        self.output.copy_(self.call(*self.inputs))


class GraphedCall:
    """`model(*tensors)` under no_grad, replayed from a CUDA graph captured once per input shapes, dtypes and layouts.

    A UNet call launches some 3,000 small kernels, and at sampling batch sizes the CPU launching them is slower
    than the GPU running them (about 18 ms of wall time for 4 ms of GPU work in issue 14's profile, H100, batch
    16); a graph launches them all at once. Each call copies its inputs into the graph's static tensors, replays it
    and returns a clone of the static output: callers may keep what they get (the GIF frames do), while the
    graph overwrites its output at the next replay. The graph records the kernels and their addresses only,
    so the model's weights must not be replaced (updated in place is fine) while a GraphedCall holds them,
    and the model must draw no random numbers (eval mode). Under autocast the weight casts are recorded too:
    give the model requires_grad=False, so that autocast does not cache them outside the graph.

    A graph is captured and replayed with the inputs' device made the current one: torch.cuda.graph and the
    streams capture on the current device, which for a model on cuda:1 is not its own unless it is made so.
    If capturing fails (an operation that cannot be captured), it says so once and calls the model directly.
    `replay_eagerly=True` replays by calling the model again (no CUDA needed): the tests' way to check the
    bookkeeping on a CPU.
    """

    def __init__(self, model, replay_eagerly: bool = False):
        self.model, self.replay_eagerly = model, replay_eagerly
        self.graphs: dict[tuple, tuple] = {}   # the inputs' shapes, dtypes, strides -> (graph, static inputs, output)
        self.failed = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.model(*inputs)
        with current_device(inputs[0].device):
            key = tuple((tuple(x.shape), x.dtype, x.stride()) for x in inputs)
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._capture(inputs)
                except RuntimeError as e:
                    print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); sampling without it",
                          file=sys.stderr)
                    self.failed = True
                    return self.model(*inputs)
            graph, static_inputs, output = self.graphs[key]
            for static, x in zip(static_inputs, inputs):
                static.copy_(x)
            graph.replay()
            return output.clone()

    @torch.no_grad()
    def _capture(self, inputs):
        static_inputs = [x.clone() for x in inputs]
        if self.replay_eagerly:
            output = self.model(*static_inputs)
            return EagerReplay(self.model, static_inputs, output), static_inputs, output
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.model(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.model(*static_inputs)
        return graph, static_inputs, output


def current_device(device: torch.device):
    """`device` made the current CUDA device for the block (nothing to do on other devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
