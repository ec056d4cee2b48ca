"""The decode lane: VAE decodes on their own thread (and CUDA stream), beside the next block's denoising."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from model.stack import ModelStack

_LANES: "weakref.WeakKeyDictionary[ModelStack, DecodeLane]" = weakref.WeakKeyDictionary()
_LANES_LOCK = threading.Lock()


class DecodeLane:
    """One background thread that runs VAE decodes — on its own CUDA stream on a GPU — so that a block's decode
    overlaps the next block's denoising: on a GPU the two kernel streams share the device, on a CPU they run
    on two cores. Jobs run in submission order; a job waits for the event its input was produced under."""

    def __init__(self, device: torch.device, threads: int | None) -> None:
        """A lane for ``device``; on a CPU its thread uses ``threads`` intra-op threads (as the main thread)."""
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vae-decode",
                                        initializer=torch.set_num_threads if threads else None,
                                        initargs=(threads,) if threads else ())

    @classmethod
    def shared(cls, stack: ModelStack) -> "DecodeLane":
        """The stack's lane, created on first use and shared by every stream on that stack."""
        with _LANES_LOCK:
            lane = _LANES.get(stack)
            if lane is None:
                lane = _LANES[stack] = cls(stack.device, stack.options.threads)
            return lane

    def submit(self, job: Callable[[], int], inputs: tuple[torch.Tensor, ...]) -> Future:
        """Run ``job()`` on the lane after the work queued so far on the caller's stream (which produced
        ``inputs``) has finished; returns its future."""
        if self.stream is None:
            return self._pool.submit(job)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))

        def on_stream() -> int:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                for t in inputs:
                    t.record_stream(self.stream)
                out = job()
                self.stream.synchronize()
                return out

        return self._pool.submit(on_stream)
