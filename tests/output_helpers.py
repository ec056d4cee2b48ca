"""A synthetic session output for the output tests: a white flash and a 1 kHz beep at the start of every second.

It has the sink interface of :class:`live.stream.output.SessionOutput` (``clock``, ``fps``, ``closed``, ``frames``,
``audio``), so the shared encoders and the RTMP push run on it unchanged, and what comes out the far end can be
checked for sync: the flash and the beep were made for the same media time.
"""

from __future__ import annotations

import asyncio
import math

import av
import numpy as np

from live.stream.clock import SessionClock
from live.stream.output import OutputClosed, VideoSource
from model.audio_features import SAMPLE_RATE

FLASH_FRAMES = 2
BEEP_HZ = 1000.0


class FlashSource(VideoSource):
    """Frames ``n`` with ``n % fps < FLASH_FRAMES`` are white, the rest dark; the audio beeps for the same time."""

    def __init__(self, fps: int = 25, width: int = 320, height: int = 176) -> None:
        self.clock = SessionClock()
        self.fps = fps
        self.closed = False
        self._n = -1
        self._tick = asyncio.Event()
        self._dark = np.full((height, width, 3), 30, np.uint8)
        self._white = np.full((height, width, 3), 235, np.uint8)

    async def run(self) -> None:
        n = math.floor(self.clock.now() * self.fps) + 1
        while not self.closed:
            await self.clock.sleep_until(n / self.fps)
            self._n = n
            self._tick.set()
            self._tick = asyncio.Event()
            n += 1

    async def next_frame(self, after: int) -> tuple[int, np.ndarray]:
        while self._n <= after:
            if self.closed:
                raise OutputClosed
            await self._tick.wait()
        n = self._n
        return n, self._white if n % self.fps < FLASH_FRAMES else self._dark

    def audio(self, start: float, count: int) -> np.ndarray:
        t = start + np.arange(count) / SAMPLE_RATE
        beep = (t % 1.0) < FLASH_FRAMES / self.fps
        return (np.sin(2 * np.pi * BEEP_HZ * t) * beep * 16000).astype(np.int16)

    def close(self) -> None:
        self.closed = True
        self._tick.set()


def flash_times(video: list[tuple[float, float]]) -> list[float]:
    """Times of the frames where a flash starts, from (time, mean luma) pairs."""
    return [t for (t, y), (_, prev) in zip(video[1:], video[:-1]) if y > 128 >= prev]


def beep_times(pcm: np.ndarray, rate: int, start: float) -> list[float]:
    """Times where a beep starts: 2.5 ms windows whose RMS crosses a quarter of full beep level."""
    win = rate // 400
    n = pcm.size // win
    rms = np.sqrt((pcm[: n * win].reshape(n, win).astype(np.float64) ** 2).mean(axis=1))
    on = rms > 0.125
    return [start + i * win / rate for i in range(1, n) if on[i] and not on[i - 1]]


def read_stream(url: str, seconds: float,
                timeout: float = 15.0) -> tuple[dict, list[tuple[float, float]], np.ndarray, int, float]:
    """Read ``seconds`` of an RTMP stream with PyAV: stream info, (time, mean luma) per video frame, the audio
    (mono float, first channel), its sample rate and the time of its first sample."""
    video: list[tuple[float, float]] = []
    audio: list[np.ndarray] = []
    audio_start = None
    rate = 0
    with av.open(url, timeout=timeout, options={"analyzeduration": "2000000"}) as container:
        vs, as_ = container.streams.video[0], container.streams.audio[0]
        info = {"video_codec": vs.codec_context.name, "audio_codec": as_.codec_context.name,
                "fps": vs.average_rate or vs.guessed_rate, "size": (vs.codec_context.width, vs.codec_context.height)}
        for frame in container.decode(vs, as_):
            if frame.time is None:
                continue
            if isinstance(frame, av.VideoFrame):
                video.append((frame.time, float(frame.to_ndarray(format="gray").mean())))
                if video[-1][0] - video[0][0] >= seconds:
                    break
            else:
                if audio_start is None:
                    audio_start, rate = frame.time, frame.sample_rate
                audio.append(frame.to_ndarray()[0].astype(np.float32))
    pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return info, video, pcm, rate, audio_start or 0.0
