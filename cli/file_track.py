"""An audio file played as a microphone track, in real time, remembering when each sample was "spoken"."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from model.audio_features import SAMPLE_RATE

PTIME = 0.02
CHUNK = round(SAMPLE_RATE * PTIME)


class FileMicTrack(MediaStreamTrack):
    """16 kHz mono PCM sent as 20 ms frames at real-time pace, then silence for as long as the peer reads."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        """Play ``pcm`` (float32 mono 16 kHz)."""
        super().__init__()
        self._pcm = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        self._chunk = 0
        self._start: float | None = None
        self.started_wall: float | None = None

    def spoken_at(self, sample: int) -> float:
        """Wall time at which a live mic would have captured ``sample``: a chunk leaves when its last sample is in."""
        if self.started_wall is None:
            raise RuntimeError("the track has not started")
        return self.started_wall - PTIME + sample / SAMPLE_RATE

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms frame, released on time."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start, self.started_wall = time.monotonic(), time.time()
        else:
            await asyncio.sleep(max(0.0, self._start + self._chunk * PTIME - time.monotonic()))
        first = self._chunk * CHUNK
        data = np.zeros(CHUNK, np.int16)
        part = self._pcm[first : first + CHUNK]
        data[: part.shape[0]] = part
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = first
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._chunk += 1
        return frame
