"""The session's input timeline: mic audio at 16 kHz mono, silence when none arrives, fed to the engine."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from live.metrics import ServerMetrics
from model.audio_features import SAMPLE_RATE


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
    than ``fill_slack_s`` the gap is filled with silence, so the engine keeps producing idle motion; audio that
    would run more than ``max_lead_s`` ahead of the clock is dropped, so latency cannot creep up.

    The engine receives the timeline in whole video frames. A frame is withheld from the engine when the engine
    already has ``max_backlog()`` frames of input waiting (it could not show this one in time anyway): the output
    repeats a frame there instead of the delay growing, and the engine spends its time on audio it can still
    show. :meth:`engine_frame` maps timeline frames to engine frames.

    The recent timeline stays readable through :meth:`read` for the delayed output audio. Memory is
    O(``history_s``), whatever the session length.
    """

    def __init__(
        self,
        *,
        fps: int,
        push: Callable[[np.ndarray], None],
        generated: Callable[[], int],
        max_backlog: Callable[[], int],
        history_s: float,
        mic_grace_s: float,
        fill_slack_s: float,
        max_lead_s: float,
        metrics: ServerMetrics,
    ) -> None:
        """Configure the timeline; ``push`` hands audio to the engine, ``generated`` counts its frames so far."""
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps {fps} does not divide {SAMPLE_RATE} Hz into whole samples per frame")
        self.samples_per_frame = SAMPLE_RATE // fps
        self._push = push
        self._generated = generated
        self._max_backlog = max_backlog
        self._history = np.zeros(math.ceil(history_s * SAMPLE_RATE), np.float32)
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
                self._push(piece)
            self.written += take
            pos += take

    def _begin_frame(self, frame: int) -> None:
        if self.engine_frames - self._generated() >= self._max_backlog():
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
