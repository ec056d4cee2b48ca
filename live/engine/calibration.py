"""``realtime: auto``: pick the largest generation size this worker sustains in real time.

At start-up a worker measures the steady block time of its profile at each candidate size (``video.realtime_sizes``,
largest first) until one sustains ``fps × (1 + margin)`` for every session the worker may hold; that size is then
used for every new session on the worker. Measurements are cached on disk, keyed by device name, torch version and
every setting that changes the block time, so later starts skip them. A user pins a size with ``realtime: off`` and
``size_area``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from live.engine.cache_pool import CachePool
from live.engine.stream import VAE_TEMPORAL_STRIDE, ProfileStack, StreamEngine
from live.settings import Settings

log = logging.getLogger(__name__)

STEADY_BLOCKS = 2  # blocks timed once the KV ring is full and every ring slot's CUDA graphs (if any) are captured


@dataclass
class RealtimeChoice:
    """What calibration chose and why (shown in /health and the logs)."""

    mode: str
    size_area: str
    block_s: float
    fps_capacity: float
    needed_fps: float
    sustains: bool
    source: str
    measured: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out.update(block_s=round(self.block_s, 4), fps_capacity=round(self.fps_capacity, 2),
                   measured={k: round(v, 4) for k, v in self.measured.items()})
        return out


def needed_fps(settings: Settings, sessions: int) -> float:
    """Frames per second a worker must generate for ``sessions`` real-time sessions with the configured margin."""
    return settings.video.fps * (1 + settings.video.realtime_margin) * max(1, sessions)


def choose_size(block_s: Callable[[str], float], settings: Settings, frames_per_block: int,
                sessions: int) -> tuple[str, dict[str, float], bool]:
    """The largest of ``realtime_sizes`` whose block time (``block_s(size)``, asked largest first and only as far
    as needed) sustains :func:`needed_fps`; the smallest, marked as not sustaining, when none does. Returns
    (size, the block times asked, whether it sustains)."""
    need = needed_fps(settings, sessions)
    measured: dict[str, float] = {}
    for size in settings.video.realtime_sizes:
        measured[size] = block_s(size)
        if frames_per_block / measured[size] >= need:
            return size, measured, True
    return settings.video.realtime_sizes[-1], measured, False


def with_size(settings: Settings, size_area: str) -> Settings:
    """``settings`` generating at ``size_area``."""
    return settings.model_copy(update={"video": settings.video.model_copy(update={"size_area": size_area})})


def size_block_s(stack: ProfileStack, size_area: str) -> float:
    """:func:`steady_block_s` at ``size_area``, for a reference of that area's own aspect ratio. The stream's caches
    (and their CUDA graphs) are dropped afterwards, not pooled: one size's KV memory at a time (720*400 and 688*368
    side by side did not fit an 80 GB H100)."""
    profile = stack.settings
    stack.settings = with_size(profile, size_area)
    aw, ah = (int(v) for v in size_area.split("*"))
    try:
        return steady_block_s(stack, Image.new("RGB", (aw, ah), (128, 128, 128)))
    finally:
        stack.settings = profile
        CachePool.shared(stack).retain(lambda key: False)
        if stack.device.type == "cuda":
            torch.cuda.empty_cache()


def steady_block_s(stack: ProfileStack, image: Image.Image | None = None) -> float:
    """Wall time of one block of a stream of ``image`` (None: the built-in character) at the stack's size once
    the stream is steady: the KV ring full, one-time costs (compilation, graph capture) paid. Audio arrives one
    block at a time, as from a live microphone, so the decode is not overlapped (a pessimistic figure)."""
    eng = StreamEngine(stack, seed=0)
    try:
        eng.start(image, "")
        cfg = stack.dit.config
        ring_blocks = cfg.kv_cache_frames // cfg.frames_per_block
        blocks = ring_blocks + (ring_blocks if stack.dit.cuda_graphs else 1) + STEADY_BLOCKS
        return max(time_silent_blocks(eng, blocks)[-STEADY_BLOCKS:])
    finally:
        eng.close()


def time_silent_blocks(eng: StreamEngine, blocks: int) -> list[float]:
    """Wall seconds of each of ``blocks`` blocks of a started stream fed silence one block at a time, as a live
    microphone delivers it (each call generates and decodes its block; the frames are dropped)."""
    eng.push_audio(np.zeros(eng.lookahead_samples, np.float32))
    times = []
    for _ in range(blocks):
        eng.push_audio(np.zeros(eng.samples_per_block, np.float32))
        t0 = time.perf_counter()
        eng.generate_block()
        eng.wait_decoded()  # a block's frames are out after its decode too
        times.append(time.perf_counter() - t0)
        eng.ring.clear()
    return times


class CalibrationCache:
    """Block times per size on disk (JSON), keyed by what they depend on; written atomically."""

    def __init__(self, path: Path) -> None:
        """A cache in ``path`` (created on first write)."""
        self.path = path

    def load(self, key: str) -> dict[str, float]:
        """The block times stored under ``key`` (empty if none, or the file is unreadable)."""
        try:
            entry = json.loads(self.path.read_text()).get(key, {})
        except (OSError, ValueError, AttributeError):
            return {}
        return {k: float(v) for k, v in entry.items()} if isinstance(entry, dict) else {}

    def store(self, key: str, times: dict[str, float]) -> None:
        """Merge ``times`` under ``key``; a failure to write is logged, never raised."""
        try:
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = {**data.get(key, {}), **times}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calibration-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the calibration cache %s: %s", self.path, exc)


def cache_key(stack: ProfileStack) -> str:
    """Device name, torch version and every setting that changes the block time."""
    s = stack.settings
    cuda = stack.device.type == "cuda"
    device = torch.cuda.get_device_name(stack.device) if cuda else f"cpu x{torch.get_num_threads()}"
    relevant = s.model_dump(mode="json", include={"dtype", "fp8", "compile", "cuda_graphs", "threads", "model",
                                                   "stream", "attention", "fp8_attention_skip_layers",
                                                   "kv_cache_dtype"})
    digest = hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    return f"{device} | torch {torch.__version__} | {digest}"


def calibrate(stack: ProfileStack, sessions: int, cache: CalibrationCache | None) -> RealtimeChoice:
    """Choose the worker's size for ``sessions`` sessions (see the module doc), measuring what the cache lacks."""
    s = stack.settings
    key = cache_key(stack)
    known = cache.load(key) if cache is not None else {}
    fresh: dict[str, float] = {}

    def block_s(size: str) -> float:
        if size not in known:
            fresh[size] = size_block_s(stack, size)
            log.info("realtime: %s takes %.3f s per block", size, fresh[size])
        return known.get(size, fresh.get(size))

    fpb = stack.dit.config.frames_per_block * VAE_TEMPORAL_STRIDE
    size, measured, sustains = choose_size(block_s, s, fpb, sessions)
    if fresh and cache is not None:
        cache.store(key, fresh)
    choice = RealtimeChoice(mode="auto", size_area=size, block_s=measured[size],
                            fps_capacity=fpb / measured[size], needed_fps=needed_fps(s, sessions),
                            sustains=sustains, source="measured" if fresh else "cache", measured=measured)
    if not sustains:
        log.warning("realtime: no size sustains %.1f fps for %d session(s); the smallest, %s, makes %.1f fps",
                    choice.needed_fps, sessions, size, choice.fps_capacity)
    return choice


def cache_for(settings: Settings) -> CalibrationCache:
    """The profile's cache: ``video.calibration_cache``, else ``$XDG_CACHE_HOME/live-avatar/calibration.json``."""
    path = settings.video.calibration_cache
    if path is None:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "live-avatar" / "calibration.json"
    return CalibrationCache(path)


def sessions_per_worker(max_sessions: int, workers: int) -> int:
    """Sessions one worker may have to hold."""
    return math.ceil(max_sessions / max(1, workers))
