"""AudioWindow: fixed windows per block, independent of chunking, causal, bounded, and flushed at the end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from live.stream.audio_window import AudioBlock, AudioWindow

B = 7680  # 12 frames at 25 fps, 16 kHz
LEFT_S, LOOK_S = 0.2, 0.1
LEFT, LOOK = 3200, 1600
LEAD_FRAMES = 3
LEAD = LEAD_FRAMES * 640


def _window(leading_silence_frames: int = LEAD_FRAMES) -> AudioWindow:
    return AudioWindow(left_context_s=LEFT_S, lookahead_s=LOOK_S, leading_silence_frames=leading_silence_frames)


def _audio(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)


def _stream(window: AudioWindow, audio: np.ndarray, sizes) -> list[AudioBlock]:
    """Push ``audio`` in chunks of ``sizes`` (cycled), taking blocks as soon as they are ready, then finish."""
    blocks, pos, i = [], 0, 0
    while pos < audio.shape[0]:
        n = sizes[i % len(sizes)]
        window.push(audio[pos : pos + n])
        pos, i = pos + n, i + 1
        while (block := window.next_block()) is not None:
            blocks.append(block)
    window.finish()
    while (block := window.next_block()) is not None:
        blocks.append(block)
    return blocks


def _expected(padded: np.ndarray, k: int) -> np.ndarray:
    """Reference window of block ``k`` over the whole (leading-silence-prefixed) stream, zeros outside it."""
    out = np.zeros(LEFT + B + LOOK, dtype=np.float32)
    start = k * B - LEFT
    lo, hi = max(start, 0), min(start + out.shape[0], padded.shape[0])
    out[lo - start : hi - start] = padded[lo:hi]
    return out


AUDIO = _audio(5 * B + 1234)


@pytest.mark.parametrize(
    "sizes",
    [[1], [7], [160], [7681], list(np.random.default_rng(1).integers(0, 5000, 50))],
    ids=["1", "7", "160", "7681", "random"],
)
def test_any_chunking_gives_the_same_blocks_as_one_big_push(sizes):
    reference = _stream(_window(), AUDIO, [AUDIO.shape[0]])
    chunked = _stream(_window(), AUDIO, sizes)
    assert len(chunked) == len(reference)
    for got, want in zip(chunked, reference):
        assert got.index == want.index
        np.testing.assert_array_equal(got.samples, want.samples)


def test_every_window_is_left_context_block_and_lookahead_of_the_stream_with_constant_length():
    blocks = _stream(_window(), AUDIO, [160])
    padded = np.concatenate([np.zeros(LEAD, dtype=np.float32), AUDIO])
    assert [b.index for b in blocks] == list(range(len(blocks)))
    for block in blocks:
        assert block.samples.dtype == np.float32
        assert block.samples.shape == (LEFT + B + LOOK,)
        assert (block.block_offset, block.block_samples) == (LEFT, B)
        np.testing.assert_array_equal(block.samples, _expected(padded, block.index))


def test_leading_silence_shifts_content_by_exactly_its_sample_count():
    with_lead = np.concatenate([b.block for b in _stream(_window(LEAD_FRAMES), AUDIO, [999])])
    without = np.concatenate([b.block for b in _stream(_window(0), AUDIO, [999])])
    assert not with_lead[:LEAD].any()
    np.testing.assert_array_equal(with_lead[LEAD : LEAD + AUDIO.shape[0]], AUDIO)
    np.testing.assert_array_equal(without[: AUDIO.shape[0]], AUDIO)


def test_later_pushes_never_change_blocks_already_returned():
    window = _window()
    window.push(AUDIO[: B + LOOK])
    first = window.next_block()
    assert first is not None and window.next_block() is None
    snapshot = first.samples.copy()
    for seed in range(20):  # enough audio to force compaction and growth of the internal buffer
        window.push(_audio(B, seed=seed + 10))
        while window.next_block() is not None:
            pass
    np.testing.assert_array_equal(first.samples, snapshot)


def test_a_block_depends_only_on_samples_up_to_the_end_of_its_lookahead():
    k = 2
    end_of_lookahead = (k + 1) * B + LOOK - LEAD
    other = AUDIO.copy()
    other[end_of_lookahead:] = _audio(other.shape[0] - end_of_lookahead, seed=7)
    a = _stream(_window(), AUDIO, [333])
    b = _stream(_window(), other, [333])
    for i in range(k + 1):
        np.testing.assert_array_equal(a[i].samples, b[i].samples)
    assert not np.array_equal(a[k + 1].samples, b[k + 1].samples)


def test_a_block_is_ready_only_once_its_lookahead_has_arrived():
    window = _window()
    window.push(AUDIO[: B + LOOK - LEAD - 1])
    assert not window.ready() and window.next_block() is None
    window.push(AUDIO[B + LOOK - LEAD - 1 : B + LOOK - LEAD])
    assert window.ready()
    assert window.next_block().index == 0


@pytest.mark.parametrize("pushed", [0, 1, B - LEAD, B - LEAD + 1, 3 * B + 17])
def test_finish_flushes_every_pushed_sample_into_zero_padded_blocks(pushed):
    window = _window()
    audio = _audio(pushed)
    window.push(audio)
    window.finish()
    blocks = []
    while window.ready():
        blocks.append(window.next_block())
    assert window.next_block() is None
    assert len(blocks) == math.ceil((LEAD + pushed) / B)
    assert window.pending_samples == 0
    stream = np.concatenate([b.block for b in blocks])
    np.testing.assert_array_equal(stream[LEAD : LEAD + pushed], audio)
    assert not stream[LEAD + pushed :].any(), "the final partial block is zero-filled"
    assert not blocks[-1].samples[LEFT + B :].any(), "lookahead past the end is zero-filled"


def test_pending_samples_counts_pushed_audio_not_yet_handed_out():
    window = _window()
    window.push(AUDIO[:B])
    assert window.pending_samples == B
    window.push(AUDIO[B : 2 * B])
    window.next_block()
    assert window.blocks_emitted == 1
    assert window.pending_samples == 2 * B - (B - LEAD)


def test_buffer_stays_bounded_over_two_thousand_blocks():
    window = _window()
    chunk = np.full(640, 0.25, dtype=np.float32)
    capacities = set()
    while window.blocks_emitted < 2000:
        window.push(chunk)
        while window.next_block() is not None:
            pass
        capacities.add(window.buffer_capacity)
    assert max(capacities) <= 2 * (LEFT + B + LOOK) + chunk.shape[0]
    assert window.pending_samples < B + LOOK + chunk.shape[0]


def test_int16_input_is_scaled_to_float():
    window = AudioWindow(left_context_s=0, lookahead_s=0)
    window.push(np.array([-32768, 0, 16384], dtype=np.int16))
    window.finish()
    np.testing.assert_array_equal(window.next_block().samples[:4], [-1.0, 0.0, 0.5, 0.0])


@pytest.mark.parametrize(
    ("pcm", "match"),
    [
        (np.zeros(10, dtype=np.float64), "float32 or int16"),
        (np.zeros(10, dtype=np.int32), "float32 or int16"),
        (np.zeros((10, 2), dtype=np.float32), "1-D"),
        (np.zeros((), dtype=np.float32), "1-D"),
    ],
)
def test_push_rejects_wrong_dtype_or_shape_with_a_clear_value_error(pcm, match):
    with pytest.raises(ValueError, match=match):
        _window().push(pcm)


def test_push_rejects_non_arrays_and_pushes_after_finish():
    window = _window()
    with pytest.raises(TypeError, match="numpy array"):
        window.push([0.0, 0.1])
    window.finish()
    with pytest.raises(RuntimeError, match="finish"):
        window.push(np.zeros(1, dtype=np.float32))


def test_block_length_that_is_not_a_whole_number_of_samples_is_rejected():
    with pytest.raises(ValueError, match="integer"):
        AudioWindow(sample_rate=16000, fps=24, frames_per_block=5, left_context_s=0, lookahead_s=0)
