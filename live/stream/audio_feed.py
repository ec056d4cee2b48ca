"""The session's input timeline: mic audio at 16 kHz mono, silence when none arrives, fed to the engine.

This module is the whole input back-pressure policy: what is dropped when the mic runs ahead of the clock, what is
filled when it falls behind, and which frames are withheld when the engine cannot show them in time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from live.metrics import ServerMetrics
from live.stream.clock import SessionClock
from model.audio_features import SAMPLE_RATE

MIC_GRACE_S = 3.0
INPUT_SLACK_S = 0.06
MAX_LEAD_S = 0.2
HISTORY_MARGIN_S = 1.0


class EngineInput(Protocol):
    """The engine as the feed sees it (a worker's ``EngineHandle``): where input goes, how far generation has
    got, and how long one of its blocks takes now."""

    frames_per_block: int
    lookahead_frames: int

    @property
    def frames_generated(self) -> int:
        """Video frames the engine has produced so far."""

    def push_audio(self, pcm: np.ndarray) -> None:
        """Hand 16 kHz mono float32 audio to the engine and wake its worker."""

    def block_time_s(self) -> float:
        """Pessimistic wall time of one block of this engine now, its worker's other engines included."""


@dataclass
class _Run:
    """Timeline frames ``first .. first+length-1`` went to the engine as engine frames ``engine_first ..``."""

    first: int
    engine_first: int
    length: int


class AudioFeed:
    """One timeline of input audio that the engine, the video output and the delayed audio output all share.

    Timeline sample 0 is the first mic sample (or, if no mic audio arrives within ``mic_grace_s``, silence from
    then on); its clock time is :attr:`origin`. Mic audio is appended as it arrives; when the mic is late by more
    than ``fill_slack_s`` the gap is filled with silence (by :meth:`run`, once per video frame), so the engine
    keeps producing idle motion; audio that would run more than ``max_lead_s`` ahead of the clock is dropped, so
    latency cannot creep up.

    The engine receives the timeline in whole video frames. A frame is withheld from the engine when the engine
    already has :meth:`max_backlog` frames of input waiting (it could not show this one within ``delay_s``
    anyway): the output repeats a frame there instead of the delay growing, and the engine spends its time on
    audio it can still show. :meth:`engine_frame` maps timeline frames to engine frames.

    The recent timeline stays readable through :meth:`read` for the delayed output audio. Memory is
    O(``delay_s``), whatever the session length.
    """

    def __init__(self, engine: EngineInput, *, fps: int, delay_s: float, metrics: ServerMetrics,
                 mic_grace_s: float = MIC_GRACE_S, fill_slack_s: float = INPUT_SLACK_S,
                 max_lead_s: float = MAX_LEAD_S) -> None:
        """Feed ``engine`` at ``fps`` video frames per second for an output that trails the input by ``delay_s``."""
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps {fps} does not divide {SAMPLE_RATE} Hz into whole samples per frame")
        self.samples_per_frame = SAMPLE_RATE // fps
        self.fps = fps
        self.delay_s = delay_s
        self._engine = engine
        self._history = np.zeros(math.ceil((delay_s + max_lead_s + HISTORY_MARGIN_S) * SAMPLE_RATE), np.float32)
        self._grace = mic_grace_s
        self._slack = round(fill_slack_s * SAMPLE_RATE)
        self._max_lead = round(max_lead_s * SAMPLE_RATE)
        self._metrics = metrics
        self.origin: float | None = None
        self.written = 0
        self.engine_frames = 0
        self.filled_samples = 0
        self.dropped_samples = 0
        self.withheld_frames = 0
        self._frame_to_engine = False
        self._runs: deque[_Run] = deque()

    async def run(self, clock: SessionClock) -> None:
        """Fill silence where the mic is late, once per video frame, until cancelled."""
        n = math.floor(clock.now() * self.fps) + 1
        while True:
            await clock.sleep_until(n / self.fps)
            self.fill(clock.now())
            n = max(n + 1, math.floor(clock.now() * self.fps) + 1)

    def max_backlog(self) -> int:
        """Frames of input the engine may have waiting: the whole blocks it can generate within the output delay
        at its current speed, plus the block still gathering its audio and lookahead (which no one computes yet;
        with the decode overlapped, a block being decoded and one being denoised are both still waiting here);
        never less than that one block plus lookahead, never more than the delay plus one block."""
        eng = self._engine
        block_s = eng.block_time_s()
        floor = eng.frames_per_block + eng.lookahead_frames
        ceiling = math.ceil(self.delay_s * self.fps) + eng.frames_per_block
        if block_s <= 0:
            return ceiling
        return max(floor, min(ceiling, eng.frames_per_block * math.floor(self.delay_s / block_s) + floor))

    def add_mic(self, pcm: np.ndarray, now: float) -> None:
        """Append mic audio (float32 mono 16 kHz) that arrived at clock time ``now``."""
        if self.origin is None:
            self.origin = now
        room = self._expected(now) + self._max_lead - self.written
        if room < pcm.shape[0]:
            dropped = pcm.shape[0] - max(room, 0)
            self.dropped_samples += dropped
            self._metrics.audio_dropped_seconds.inc(dropped / SAMPLE_RATE)
            pcm = pcm[: max(room, 0)]
        self._append(pcm)

    def fill(self, now: float) -> bool:
        """Append silence where the mic is late at clock time ``now``; returns whether anything was appended."""
        if self.origin is None:
            if now < self._grace:
                return False
            self.origin = now
        missing = self._expected(now) - self.written
        if missing <= self._slack:
            return False
        self.filled_samples += missing
        self._metrics.audio_filled_seconds.inc(missing / SAMPLE_RATE)
        self._append(np.zeros(missing, np.float32))
        return True

    def read(self, start: int, count: int) -> np.ndarray:
        """Timeline samples ``[start, start+count)``; zeros where they are not written yet or already forgotten."""
        out = np.zeros(count, np.float32)
        cap = self._history.shape[0]
        lo, hi = max(start, self.written - cap, 0), min(start + count, self.written)
        if hi > lo:
            idx = np.arange(lo, hi) % cap
            out[lo - start : hi - start] = self._history[idx]
        return out

    def engine_frame(self, frame: int) -> int | None:
        """The engine frame that shows timeline frame ``frame``; None if it was withheld or is not fed yet."""
        for run in reversed(self._runs):
            if run.first <= frame < run.first + run.length:
                return run.engine_first + frame - run.first
            if frame >= run.first + run.length:
                return None
        return None

    def forget_before(self, frame: int) -> None:
        """Drop the mapping of timeline frames before ``frame`` (the output has passed them)."""
        while len(self._runs) > 1 and self._runs[0].first + self._runs[0].length <= frame:
            self._runs.popleft()

    def _expected(self, now: float) -> int:
        return round((now - self.origin) * SAMPLE_RATE)

    def _append(self, pcm: np.ndarray) -> None:
        pos = 0
        while pos < pcm.shape[0]:
            offset = self.written % self.samples_per_frame
            if offset == 0:
                self._begin_frame(self.written // self.samples_per_frame)
            take = min(self.samples_per_frame - offset, pcm.shape[0] - pos)
            piece = pcm[pos : pos + take]
            cap = self._history.shape[0]
            self._history[np.arange(self.written, self.written + take) % cap] = piece
            if self._frame_to_engine:
                self._engine.push_audio(piece)
            self.written += take
            pos += take

    def _begin_frame(self, frame: int) -> None:
        if self.engine_frames - self._engine.frames_generated >= self.max_backlog():
            self._frame_to_engine = False
            self.withheld_frames += 1
            self._metrics.audio_dropped_seconds.inc(self.samples_per_frame / SAMPLE_RATE)
            return
        self._frame_to_engine = True
        last = self._runs[-1] if self._runs else None
        if last is not None and last.first + last.length == frame:
            last.length += 1
        else:
            self._runs.append(_Run(frame, self.engine_frames, 1))
        self.engine_frames += 1
