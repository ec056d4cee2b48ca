"""A session's output: one clock-driven pump that takes frames from the engine's ring and feeds every sink."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import numpy as np

from live.metrics import RateMeter, ServerMetrics
from live.stream.audio_feed import AudioFeed
from live.stream.clock import SessionClock
from live.stream.frame_ring import FrameRing, RingClosed
from model.audio_features import SAMPLE_RATE

PREROLL_RGB = (22, 24, 28)


class OutputClosed(Exception):
    """The session's output has ended."""


class VideoSource:
    """Numbered video frames for sinks; subclasses publish them through :meth:`next_frame`."""

    async def next_frame(self, after: int) -> tuple[int, np.ndarray]:
        """The newest frame with an index above ``after``; raises :class:`OutputClosed` once the source ended."""
        raise NotImplementedError

    async def frames(self) -> AsyncIterator[tuple[int, np.ndarray]]:
        """``(index, rgb)`` for each frame a sink keeps up with (newest first, slower sinks skip), until the end."""
        last = -1
        while True:
            try:
                last, frame = await self.next_frame(last)
            except OutputClosed:
                return
            yield last, frame


class SessionOutput(VideoSource):
    """Publishes video frame ``n`` at clock time ``n / fps`` and serves audio of the same media time.

    Video frame ``n`` shows timeline frame ``n - offset_frames``; the audio of media time ``t`` is timeline audio at
    ``t - offset_frames / fps``. So both outputs carry the input delayed by exactly the same amount and stay in sync
    by construction. The offset is fixed once, at the first tick that is at least ``delay_s`` after the input
    started and has the engine's first frame ready (so a slow first block lengthens the delay instead of starting
    with repeats); until then the video shows a plain pre-roll frame and the audio is silent. Afterwards, when the
    engine has not produced the due frame, the last frame is repeated (counted) and stale frames are skipped once
    they arrive; the audio never waits for video.

    Sinks read from here: :meth:`frames` for video, :meth:`audio` for audio — the session's shared encoders (whose
    packets feed the WebRTC senders and the RTMP push, see :mod:`live.sinks.encoder`) and the virtual camera. The pump is
    the only reader of the frame ring; the latest frame is the only frame it keeps.
    """

    def __init__(self, clock: SessionClock, fps: int, feed: AudioFeed, ring: FrameRing, width: int, height: int,
                 delay_s: float, metrics: ServerMetrics) -> None:
        """Pump ``ring`` at ``fps`` on ``clock``; the output trails the input timeline by at least ``delay_s``."""
        self.clock = clock
        self.fps = fps
        self.delay_s = delay_s
        self._feed = feed
        self._ring = ring
        self._metrics = metrics
        self._preroll = np.empty((height, width, 3), np.uint8)
        self._preroll[:] = PREROLL_RGB
        self._last = self._preroll
        self._offset: int | None = None
        self._next_engine = 0
        self._shown_engine = -1
        self._latest_n = -1
        self._latest = self._preroll
        self._tick = asyncio.Event()
        self._closed = False
        self.frames_sent = 0
        self.frames_repeated = 0
        self.sent_meter = RateMeter()

    @property
    def offset_frames(self) -> int | None:
        """Video frames between the timeline's origin and the output showing it; None until fixed."""
        return self._offset

    @property
    def output_delay_s(self) -> float | None:
        """Seconds between input audio reaching the server and its frame (and audio) leaving it."""
        k = self.offset_frames
        return None if k is None else k / self.fps - self._feed.origin

    async def run(self) -> None:
        """The pump: one tick per video frame until :meth:`close`."""
        n = math.floor(self.clock.now() * self.fps) + 1
        while not self._closed:
            await self.clock.sleep_until(n / self.fps)
            n = max(n, math.floor(self.clock.now() * self.fps))
            try:
                frame = self._due_frame(n)
            except RingClosed:
                break
            self._latest_n, self._latest = n, frame
            self.frames_sent += 1
            self.sent_meter.add()
            self._metrics.frames_sent.inc()
            self._tick.set()
            self._tick = asyncio.Event()
            n += 1
        self.close()

    async def next_frame(self, after: int) -> tuple[int, np.ndarray]:
        """The newest frame with an index above ``after`` (waits for the next tick if needed)."""
        while self._latest_n <= after:
            if self._closed:
                raise OutputClosed
            await self._tick.wait()
        return self._latest_n, self._latest

    def audio(self, start: float, count: int) -> np.ndarray:
        """``count`` output samples (16 kHz mono int16) starting at media time ``start`` seconds."""
        k = self.offset_frames
        if k is None:
            return np.zeros(count, np.int16)
        first = round((start - k / self.fps) * SAMPLE_RATE)
        pcm = self._feed.read(first, count)
        return (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)

    def close(self) -> None:
        """Stop the pump and release every waiting sink."""
        self._closed = True
        self._tick.set()

    @property
    def closed(self) -> bool:
        """Whether the output has ended."""
        return self._closed

    def _due_frame(self, n: int) -> np.ndarray:
        if self._offset is None and self._feed.origin is not None and len(self._ring) > 0:
            if n >= math.ceil((self._feed.origin + self.delay_s) * self.fps):
                self._offset = n
        k = self._offset
        if k is None or n < k:
            return self._preroll
        frame = n - k
        self._feed.forget_before(frame)
        target = self._feed.engine_frame(frame)
        if target is not None:
            while self._next_engine <= target:
                got = self._ring.get_nowait()
                if got is None:
                    break
                self._last = got.numpy()
                self._shown_engine = self._next_engine
                self._next_engine += 1
        if target is None or self._shown_engine != target:
            self.frames_repeated += 1
            self._metrics.frames_repeated.inc()
        return self._last
