"""The VAE decode of a block overlapping the next block's denoising (``stream.overlap_decode``, DecodeLane)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from live.engine.decode_lane import DecodeLane
from live.engine.stream import ProfileStack, StreamEngine, overlap_enabled
from tests.conftest import make_speechlike


@pytest.fixture(scope="module")
def stacks(tiny_settings):
    def load(overlap: bool) -> ProfileStack:
        s = tiny_settings
        stream = s.stream.model_copy(update={"overlap_decode": overlap})
        return ProfileStack.from_settings(s.model_copy(update={"stream": stream}))

    return load(True), load(False)


def _render_ahead(stack: ProfileStack, audio: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """All audio pushed up front; returns the frames and the frames each call put into the ring."""
    eng = StreamEngine(stack, seed=3)
    eng.start()
    eng.push_audio(audio)
    eng.finish_audio()
    frames, counts = [], []
    while eng.block_ready():
        counts.append(eng.generate_block())
        while (f := eng.ring.get_nowait()) is not None:
            frames.append(f.numpy())
    eng.close()
    return np.stack(frames), counts


def test_overlapped_decode_gives_the_same_frames_in_the_same_order(stacks):
    overlapped, serial = stacks
    audio = make_speechlike(3.0, seed=7)
    a, counts_a = _render_ahead(overlapped, audio)
    b, counts_b = _render_ahead(serial, audio)
    assert a.shape == b.shape and sum(counts_a) == a.shape[0]
    assert np.array_equal(a, b)
    # with audio ahead, a call hands over the previous block's frames: the first call returns none
    assert counts_a[0] == 0 and counts_b[0] > 0


def test_decode_in_flight_keeps_the_engine_ready_and_needs_ring_room(stacks):
    overlapped, _ = stacks
    eng = StreamEngine(overlapped, seed=0)
    eng.start()
    eng.push_audio(make_speechlike(1.5, seed=1))  # three blocks' worth: the first two overlap
    assert eng.generate_block() == 0
    assert eng._decoding is not None  # block 0 decodes while the caller is back
    eng._decoding[0].result()
    assert eng.frames_in_flight == 0  # finished decodes are already in the ring, so they need no more room
    assert len(eng.ring) == eng.frames_per_block - eng.drop_first
    while eng.block_ready():
        eng.generate_block()
    assert eng._decoding is None and eng.blocks_done >= 2
    eng.close()


def test_a_live_feed_denoises_the_next_block_while_the_last_one_decodes(stacks):
    """A worker serving live audio is not held by a decode: the call returns once the block is denoised, and when
    the next block's audio arrives it can be denoised while the last block is still decoding."""
    overlapped, _ = stacks
    eng = StreamEngine(overlapped, seed=0)
    eng.start()
    gate = threading.Event()
    busy = DecodeLane.shared(overlapped).submit(lambda: gate.wait(30) and 0, ())  # the lane decodes another stream
    try:
        eng.push_audio(make_speechlike(0.6, seed=2))  # block 0 and its lookahead, not block 1's
        assert eng.generate_block() == 0  # denoised; its decode waits behind the other stream's
        assert eng._decoding is not None and not eng.work_ready()  # nothing to do now without waiting
        eng.push_audio(make_speechlike(0.5, seed=3))  # block 1's audio arrives
        assert eng.work_ready()  # free to denoise block 1 while block 0 is still decoding
    finally:
        gate.set()
    busy.result()
    assert eng.generate_block() == eng.frames_per_block - eng.drop_first  # block 1 denoised, block 0 counted
    eng._decoding[0].result()
    assert len(eng.ring) == 2 * eng.frames_per_block - eng.drop_first  # block 1's frames are in without a call
    assert eng.work_ready() and eng.generate_block() == eng.frames_per_block
    assert eng._decoding is None and not eng.work_ready()
    eng.close()


def test_close_with_a_decode_in_flight_does_not_hang_or_leak(stacks):
    overlapped, _ = stacks
    eng = StreamEngine(overlapped, seed=0)
    eng.start()
    eng.push_audio(make_speechlike(2.0, seed=4))
    eng.generate_block()
    eng.close()
    assert eng._decoding is None and not hasattr(eng, "decoder")
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate_block()


def test_decode_lane_uses_the_profiles_thread_count(stacks):
    overlapped, _ = stacks
    lane = DecodeLane.shared(overlapped)
    assert lane is DecodeLane.shared(overlapped)
    threads = lane._pool.submit(torch.get_num_threads).result()
    assert threads == overlapped.settings.threads


def test_auto_overlap_is_on_for_a_cpu_and_explicit_settings_win():
    cpu = torch.device("cpu")
    assert overlap_enabled("auto", cpu) and overlap_enabled(True, cpu) and not overlap_enabled(False, cpu)
