"""CUDA graphs of a stream's steady-state denoising steps.

Once a stream's KV ring is full, one denoising step of one block always launches the same kernels on the same
buffers except for where it writes its keys (the ring slot) and the values it reads (latents, timestep, audio
tokens, RoPE tables, text K/V). :class:`StepGraphs` captures one graph per (step, ring slot) — with
``kv_cache_frames / frames_per_block`` slots and 4 steps that is 16 graphs per stream, sharing one memory pool —
and replays it after copying the call's inputs into the graph's static buffers, so the ~1,500 kernel launches
of a 40-layer step cost one launch. Graphs replay on the stream that captured them, never concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


class StepGraphs:
    """The captured steps of one stream (they hold its KV buffers by address, so they live with its caches)."""

    def __init__(self) -> None:
        """No graphs yet; each key is captured at its first :meth:`run`."""
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._inputs: list[torch.Tensor] | None = None
        self._text: KV | None = None
        self._text_source: KV | None = None

    def run(self, key: tuple[int, ...], step: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
            text_kv: KV) -> torch.Tensor:
        """``step(*inputs, text_kv)`` through the graph for ``key`` (captured now if new). Every key takes inputs
        of the same shapes. The returned tensor is the graph's output buffer: it is overwritten by the next
        replay of the same key, so use it before then."""
        if self._inputs is None:
            self._inputs = [t.clone() for t in inputs]
            self._text = [(k.clone(), v.clone()) for k, v in text_kv]
            self._text_source = text_kv
        for static, t in zip(self._inputs, inputs, strict=True):
            if static.shape != t.shape:
                raise ValueError(f"graph input shape changed from {tuple(static.shape)} to {tuple(t.shape)}")
            static.copy_(t)
        if text_kv is not self._text_source:  # a new prompt: its K/V into the buffers the graphs read
            for (sk, sv), (k, v) in zip(self._text, text_kv, strict=True):
                sk.copy_(k)
                sv.copy_(v)
            self._text_source = text_kv
        entry = self.graphs.get(key)
        if entry is None:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the decode lane and the pipeline's receive thread may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = step(*self._inputs, self._text)
            entry = self.graphs[key] = (graph, out)
        entry[0].replay()
        return entry[1]
