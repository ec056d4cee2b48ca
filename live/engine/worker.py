"""Engine workers: one thread per device that owns the models and runs every session's engine placed on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from live.engine.cache_pool import CachePool
from live.engine.calibration import (
    RealtimeChoice,
    cache_for,
    calibrate,
    steady_block_s,
    time_silent_blocks,
    with_size,
)
from live.engine.pipeline import PipelineEngine
from live.engine.stream import ProfileStack, StreamEngine
from live.metrics import ServerMetrics
from live.settings import Settings
from model.audio_features import SAMPLE_RATE

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02
WARMUP_BLOCKS = 3


class WorkerBusy(RuntimeError):
    """The worker's queue of engines waiting to start is full."""


@dataclass(eq=False)
class EngineHandle:
    """One session's engine as placed on a worker.

    ``frames_generated`` is written by the worker thread only; ``error`` is set there if a block fails, after
    which ``on_error`` (if given) is called on the worker thread. ``closed`` completes once the worker has closed
    the engine and dropped it.
    """

    engine: StreamEngine
    worker: "EngineWorker"
    frames_generated: int = 0
    error: BaseException | None = None
    on_error: Callable[[BaseException], None] | None = None
    closing: bool = field(default=False, repr=False)
    closed: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)

    def close(self) -> None:
        """Ask the worker to close the engine and free its caches (thread-safe, idempotent); see ``closed``."""
        self.closing = True
        self.worker.wake()

    @property
    def frames_per_block(self) -> int:
        """Video frames of one block."""
        return self.engine.frames_per_block

    @property
    def lookahead_frames(self) -> int:
        """Video frames of audio the engine needs beyond a block before it can generate that block."""
        return math.ceil(self.engine.lookahead_samples * self.engine.fps / SAMPLE_RATE)

    def push_audio(self, pcm: np.ndarray) -> None:
        """Hand 16 kHz mono float32 audio to the engine (dropped once closing) and wake the worker."""
        if not self.closing:
            self.engine.push_audio(pcm)
            self.worker.wake()

    def block_time_s(self) -> float:
        """Pessimistic wall time of one block of this engine: its worker's block time × the engines it serves."""
        return self.worker.block_estimate_s() * max(1, self.worker.engines)


@dataclass
class _Open:
    future: concurrent.futures.Future
    image: Image.Image | None
    prompt: str
    seed: int


class EngineWorker:
    """A thread that loads a :class:`ModelStack` once and runs blocks for every engine placed on it.

    The event loop never runs model code: it submits engine starts, pushes audio (thread-safe on the engine) and
    calls :meth:`wake`. The thread serves engines round-robin, one block at a time, choosing only engines whose
    next block has its audio and whose frame ring has room for it — so ``generate_block`` never waits on a full
    ring and one slow consumer cannot stall the other sessions.
    """

    def __init__(self, settings: Settings, metrics: ServerMetrics, max_pending: int = 8, sessions: int = 1) -> None:
        """Prepare a worker for ``settings.device`` that may hold ``sessions`` sessions at once (what
        ``realtime: auto`` sizes for); :meth:`start` launches the thread."""
        self.settings = settings
        self.device = settings.device
        self.metrics = metrics
        self.sessions = sessions
        self.load_error: BaseException | None = None
        self.warmup_block_s: float | None = None
        self.realtime: RealtimeChoice | None = None
        self._opens: queue.Queue[_Open] = queue.Queue(maxsize=max_pending)
        self._handles: list[EngineHandle] = []
        self._recent_block_s: deque[float] = deque(maxlen=64)
        self._rr = 0
        self._on_cuda = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.device}", daemon=True)

    # ----- event-loop side -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it loads the models and measures a few warm-up blocks."""
        self._thread.start()

    async def wait_ready(self) -> None:
        """Wait until the models are loaded; raises the load error if loading failed."""
        await asyncio.to_thread(self._ready.wait)
        if self.load_error is not None:
            raise self.load_error

    @property
    def ready(self) -> bool:
        """Whether the models are loaded and the worker serves engines."""
        return self._ready.is_set() and self.load_error is None

    @property
    def engines(self) -> int:
        """Engines placed on this worker now."""
        return len(self._handles)

    def memory_gib(self) -> dict[str, float] | None:
        """The GPU memory PyTorch holds for this worker's device now and at its peak (None on a CPU); allocator
        counters only, so it never waits on the GPU."""
        if not self._on_cuda:
            return None
        device = torch.device(self.device)
        return {"allocated": round(torch.cuda.memory_allocated(device) / 2**30, 2),
                "peak": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}

    def block_estimate_s(self) -> float:
        """A pessimistic wall time of one block: the larger of the warm-up time and the recent 90th percentile."""
        recent = sorted(self._recent_block_s)
        p90 = recent[int(0.9 * (len(recent) - 1))] if recent else 0.0
        return max(self.warmup_block_s or 0.0, p90)

    async def open(self, image: Image.Image | None, prompt: str, seed: int) -> EngineHandle:
        """Create and start a session's engine on the worker thread; raises :class:`WorkerBusy` if too many wait."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._opens.put_nowait(_Open(fut, image, prompt, seed))
        except queue.Full:
            raise WorkerBusy(f"engine worker {self.device} has {self._opens.maxsize} sessions starting already; "
                             "try again in a moment") from None
        self.wake()
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # The caller went away while the engine was starting: close it as soon as it exists.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().close())
            raise

    def wake(self) -> None:
        """Tell the thread that something changed (audio arrived, an engine is closing)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close every engine (blocking; call through ``asyncio.to_thread``)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ----- worker thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            stack = ProfileStack.from_settings(self.settings)
            self._on_cuda = stack.device.type == "cuda"
            pool = CachePool.shared(stack)
            pool.limit = self.sessions
            if self.settings.video.realtime == "auto":
                self.realtime = calibrate(stack, self.sessions, cache_for(self.settings))
                stack.settings = with_size(stack.settings, self.realtime.size_area)
                pool.retain(lambda key: False)  # calibration streams' shapes; the warm-up's stays for sessions
                log.info("engine worker %s: realtime auto chose %s (%.1f fps capacity, %.1f needed, %s)",
                         self.device, self.realtime.size_area, self.realtime.fps_capacity,
                         self.realtime.needed_fps, self.realtime.source)
            self.warmup_block_s = self._warm_up(stack)
            log.info("engine worker %s ready: %.3f s per block", self.device, self.warmup_block_s)
        except BaseException as exc:  # noqa: BLE001 - reported through /health and wait_ready()
            log.exception("engine worker %s failed to load", self.device)
            self.load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._start_pending(stack)
                self._close_finished()
                handle = self._next_ready()
                if handle is None:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._generate(handle)
        finally:
            for handle in self._handles:
                handle.closing = True
            self._close_finished()
            self._fail_pending(RuntimeError("engine worker stopped"))

    def _warm_up(self, stack: ProfileStack) -> float:
        """Run silent blocks of the built-in character: pays one-time costs (compilation, the CUDA graphs of
        caches that then wait in the pool for the first session) and measures the block time used to size
        latency. Audio is fed one block at a time, as a live microphone delivers it, so each timed call generates
        and decodes one block (no decode overlap, which only happens when a stream is behind)."""
        if stack.settings.pipeline.world_size == 1:
            return steady_block_s(stack)
        eng = create_engine(stack, seed=0)
        try:
            eng.start(None, "")
            return max(time_silent_blocks(eng, WARMUP_BLOCKS)[1:])
        finally:
            eng.close()

    def _start_pending(self, stack: ProfileStack) -> None:
        while True:
            try:
                req = self._opens.get_nowait()
            except queue.Empty:
                return
            if not req.future.set_running_or_notify_cancel():
                continue
            eng = create_engine(stack, seed=req.seed)
            try:
                eng.start(req.image, req.prompt)
            except BaseException as exc:  # noqa: BLE001 - the session gets the error, the worker goes on
                eng.close()
                req.future.set_exception(exc)
                continue
            handle = EngineHandle(eng, self)
            self._handles.append(handle)
            req.future.set_result(handle)

    def _fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                req = self._opens.get_nowait()
            except queue.Empty:
                return
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(exc)

    def _close_finished(self) -> None:
        closing = [h for h in self._handles if h.closing]
        if not closing:
            return
        self._handles = [h for h in self._handles if not h.closing]
        for handle in closing:
            handle.engine.close()
            if not handle.closed.done():
                handle.closed.set_result(None)
        if not self._handles and self._on_cuda:
            # Hand the freed caches back to the device, not just to PyTorch's allocator.
            torch.cuda.empty_cache()

    def _next_ready(self) -> EngineHandle | None:
        n = len(self._handles)
        for k in range(n):
            idx = (self._rr + k) % n
            handle = self._handles[idx]
            eng = handle.engine
            room = eng.ring.capacity - len(eng.ring) - eng.frames_in_flight
            if handle.error is None and eng.work_ready() and room >= eng.frames_per_block:
                self._rr = (idx + 1) % n
                return handle
        return None

    def _generate(self, handle: EngineHandle) -> None:
        t0 = time.perf_counter()
        try:
            produced = handle.engine.generate_block()
        except BaseException as exc:  # noqa: BLE001 - one session fails, the others go on
            log.exception("engine block failed on %s", self.device)
            handle.error = exc
            handle.closing = True
            if handle.on_error is not None:
                handle.on_error(exc)
            return
        # a block's frames are out after its denoising and, when that runs in the background, its decode
        dt = time.perf_counter() - t0 + handle.engine.background_decode_s
        self._recent_block_s.append(dt)
        self.metrics.block_seconds.observe(dt)
        self.metrics.frames_generated.inc(produced)
        handle.frames_generated += produced


def create_engine(stack: ProfileStack, seed: int | None = None) -> StreamEngine:
    """The engine for one stream on ``stack``: a :class:`~live.engine.pipeline.PipelineEngine` (this process is
    rank 0 of a step pipeline over ``settings.pipeline.world_size`` GPUs) when that is above 1, else a
    StreamEngine."""
    if stack.settings.pipeline.world_size > 1:
        return PipelineEngine(stack, seed)
    return StreamEngine(stack, seed)


def worker_devices(settings: Settings) -> list[str]:
    """Devices to run one worker each on: every visible GPU for ``device: auto``, else the configured device.

    A step pipeline (``pipeline.world_size > 1``) spans the GPUs itself, so it gets a single worker.
    """
    if settings.device == "auto" and settings.pipeline.world_size == 1:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    return [settings.device]
