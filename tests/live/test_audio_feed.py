"""AudioFeed: the input back-pressure policy, in one place."""

from __future__ import annotations

import numpy as np

from live.metrics import ServerMetrics
from live.stream.audio_feed import AudioFeed
from model.audio_features import SAMPLE_RATE

FPS = 25
SPF = SAMPLE_RATE // FPS


class _Engine:
    """The engine's side: it keeps pushed audio, reports generated frames and a block time set by the test."""

    frames_per_block = 12
    lookahead_frames = 2

    def __init__(self, block_s: float) -> None:
        self.block_s = block_s
        self.pushed = 0
        self.frames_generated = 0

    def push_audio(self, pcm: np.ndarray) -> None:
        self.pushed += pcm.size

    def block_time_s(self) -> float:
        return self.block_s


def test_backlog_follows_the_engines_speed_within_one_block_plus_lookahead_and_the_delay():
    feed = AudioFeed(_Engine(0.6), fps=FPS, delay_s=1.0, metrics=ServerMetrics())
    assert feed.max_backlog() == 12 + 14  # one whole block fits in 1 s at 0.6 s, plus the block gathering audio
    feed._engine.block_s = 2.0
    assert feed.max_backlog() == 14  # never below one block plus lookahead
    feed._engine.block_s = 0.01
    assert feed.max_backlog() == 25 + 12  # never above the delay plus one block


def test_frames_the_engine_cannot_show_in_time_are_withheld_and_mapped_around():
    engine = _Engine(0.6)
    feed = AudioFeed(engine, fps=FPS, delay_s=1.0, metrics=ServerMetrics(), max_lead_s=100)
    feed.add_mic(np.zeros(30 * SPF, np.float32), now=0.0)
    assert feed.engine_frames == 26 and feed.withheld_frames == 4 and engine.pushed == 26 * SPF
    engine.frames_generated = 12
    feed.add_mic(np.zeros(4 * SPF, np.float32), now=0.0)
    assert feed.engine_frames == 30
    assert feed.engine_frame(25) == 25 and feed.engine_frame(27) is None and feed.engine_frame(31) == 27


def test_mic_running_ahead_of_the_clock_is_dropped_and_silence_fills_a_late_mic():
    engine = _Engine(0.0)
    feed = AudioFeed(engine, fps=FPS, delay_s=1.0, metrics=ServerMetrics())
    feed.add_mic(np.ones(SAMPLE_RATE, np.float32), now=0.0)
    assert feed.written == round(0.2 * SAMPLE_RATE) and feed.dropped_samples == SAMPLE_RATE - feed.written
    assert feed.fill(now=1.0) and feed.written == SAMPLE_RATE
    assert not feed.fill(now=1.0 + 0.05)  # within the slack
