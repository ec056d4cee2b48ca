"""The session output on its own: one clock for audio and video, repeats when generation is late, bounded delay.

A producer task plays the engine's side of the real FrameRing (it writes frames whose pixels carry their engine
frame index) so that lateness can be made to happen on purpose; the real engine is exercised by the other
server tests.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from live.metrics import ServerMetrics
from live.stream.audio_feed import AudioFeed
from live.stream.clock import SessionClock
from live.stream.frame_ring import FrameRing
from live.stream.output import SessionOutput
from model.audio_features import SAMPLE_RATE

FPS = 25
SPF = SAMPLE_RATE // FPS
BLOCK = 12
STALL_BLOCK = 3


def _timeline(seconds: float) -> np.ndarray:
    """Input audio whose every sample is distinguishable: a slow ramp."""
    return (np.arange(int(seconds * SAMPLE_RATE)) % 30000 / 30000).astype(np.float32)


class _Engine:
    """The engine's side of the feed, played by the test: it keeps what is pushed and counts what it made."""

    frames_per_block = BLOCK
    lookahead_frames = 0

    def __init__(self) -> None:
        self.pushed: list[np.ndarray] = []
        self.frames_generated = 0

    def push_audio(self, pcm: np.ndarray) -> None:
        self.pushed.append(pcm)

    def block_time_s(self) -> float:
        return 0.0


async def test_video_repeats_when_late_and_audio_keeps_its_clock():
    clock = SessionClock()
    metrics = ServerMetrics()
    ring = FrameRing(48, 8, 8)
    produced = _Engine()
    # The feed's delay is generous so that it withholds nothing: lateness here must show as repeats.
    feed = AudioFeed(produced, fps=FPS, delay_s=10, metrics=metrics, mic_grace_s=5)
    output = SessionOutput(clock, FPS, feed, ring, 8, 8, delay_s=0.3, metrics=metrics)
    pump = asyncio.ensure_future(output.run())
    filler = asyncio.ensure_future(feed.run(clock))
    pcm = _timeline(4.0)

    async def mic() -> None:
        for i in range(0, pcm.size, 320):
            await clock.sleep_until(0.2 + i / SAMPLE_RATE)
            feed.add_mic(pcm[i : i + 320], clock.now())

    async def engine() -> None:
        # One block per 12 frames of input, on time, except block STALL_BLOCK, which is 1 s late.
        for b in range(8):
            while feed.engine_frames < (b + 1) * BLOCK:
                await asyncio.sleep(0.005)
            if b == STALL_BLOCK:
                await asyncio.sleep(1.0)
            frames = torch.arange(b * BLOCK, (b + 1) * BLOCK, dtype=torch.uint8)[:, None, None, None]
            ring.put(frames.expand(BLOCK, 8, 8, 3).contiguous())
            produced.frames_generated += BLOCK

    shown: list[tuple[int, int]] = []
    audio: list[tuple[int, np.ndarray]] = []

    async def sink() -> None:
        last = -1
        while len(shown) < 90:
            n, frame = await output.next_frame(last)
            last = n
            if output.offset_frames is not None and n >= output.offset_frames:
                shown.append((n, int(frame[0, 0, 0])))
                audio.append((n, output.audio(n / FPS, SPF)))

    tasks = [asyncio.ensure_future(mic()), asyncio.ensure_future(engine())]
    await asyncio.wait_for(sink(), 30)
    output.close()
    for t in (*tasks, pump, filler):
        t.cancel()

    k = output.offset_frames
    assert output.output_delay_s >= 0.3
    repeats = [(n, idx) for n, idx in shown if idx != n - k]
    # Frames are never ahead of their audio; late ones repeat the last frame, and the stall is caught up.
    assert all(idx <= n - k for n, idx in shown)
    assert repeats and all(STALL_BLOCK * BLOCK <= n - k < (STALL_BLOCK + 1) * BLOCK + FPS for n, _ in repeats)
    assert [idx for n, idx in shown[-10:]] == [n - k for n, _ in shown[-10:]]
    assert output.frames_repeated >= len(repeats)
    # The audio never waits for the video: each frame's audio is the input it shows, stall or not.
    for n, chunk in audio:
        expected = pcm[(n - k) * SPF : (n - k + 1) * SPF]
        assert np.allclose(chunk[: expected.size] / 32767, expected, atol=1e-3)
