"""Turns a stream of 16 kHz mono PCM chunks of any size into fixed-size per-block audio windows for the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.audio_features import SAMPLE_RATE


@dataclass(frozen=True)
class AudioBlock:
    """The audio the model sees for block ``index``: ``samples`` = [left context | block | lookahead]."""

    index: int
    samples: np.ndarray
    block_offset: int
    block_samples: int

    @property
    def block(self) -> np.ndarray:
        """The block's own samples, without context or lookahead."""
        return self.samples[self.block_offset : self.block_offset + self.block_samples]


class AudioWindow:
    """Rolling PCM buffer that hands out one constant-length window per video block.

    Stream time starts with ``leading_silence_frames`` video frames of zeros, then the pushed audio. Block ``k``
    covers stream samples ``[k*B, (k+1)*B)`` with ``B = sample_rate * frames_per_block / fps``; its window adds
    ``left_context_s`` before and ``lookahead_s`` after, zero-filled before the stream start and (after
    ``finish()``) past its end.

    Causality: once ``next_block()`` returned block ``k``, nothing pushed later can change it, and a block's
    content depends only on stream samples up to the end of its lookahead (plus the zero padding of ``finish()``).

    Memory is bounded: only samples a future block can still need (left context onward) are kept, in one numpy
    buffer that is compacted in place and grows only while more audio is queued than it can hold.
    """

    def __init__(
        self,
        *,
        sample_rate: int = SAMPLE_RATE,
        fps: int = 25,
        frames_per_block: int = 12,
        left_context_s: float,
        lookahead_s: float,
        leading_silence_frames: int = 0,
    ) -> None:
        """Configure block size, context and lookahead; every window has ``window_samples`` samples."""
        if sample_rate <= 0 or fps <= 0 or frames_per_block <= 0:
            raise ValueError(
                f"sample_rate, fps and frames_per_block must be > 0, got {sample_rate}, {fps}, {frames_per_block}"
            )
        if left_context_s < 0 or lookahead_s < 0 or leading_silence_frames < 0:
            raise ValueError("left_context_s, lookahead_s and leading_silence_frames must be >= 0")
        if sample_rate * frames_per_block % fps:
            raise ValueError(
                f"a block of {frames_per_block} frames at {fps} fps is {sample_rate * frames_per_block / fps} samples "
                f"at {sample_rate} Hz; choose values where sample_rate * frames_per_block / fps is an integer"
            )
        if sample_rate * leading_silence_frames % fps:
            raise ValueError(
                f"{leading_silence_frames} frames at {fps} fps is not a whole number of samples at {sample_rate} Hz"
            )
        self.sample_rate = sample_rate
        self.block_samples = sample_rate * frames_per_block // fps
        self.left_samples = round(left_context_s * sample_rate)
        self.lookahead_samples = round(lookahead_s * sample_rate)
        self.window_samples = self.left_samples + self.block_samples + self.lookahead_samples
        self.leading_samples = sample_rate * leading_silence_frames // fps

        self._buf = np.zeros(max(2 * self.window_samples, self.leading_samples, 1), dtype=np.float32)
        self._buf_start = 0  # stream index of self._buf[0]
        self._buf_len = 0
        self._pushed = 0
        self._emitted = 0
        self._finished = False
        self._append(np.zeros(self.leading_samples, dtype=np.float32))

    @property
    def blocks_emitted(self) -> int:
        """Blocks handed out by ``next_block()`` so far."""
        return self._emitted

    @property
    def pending_samples(self) -> int:
        """Pushed samples not yet inside a handed-out block."""
        covered = max(0, self._emitted * self.block_samples - self.leading_samples)
        return max(0, self._pushed - covered)

    @property
    def finished(self) -> bool:
        """Whether ``finish()`` was called."""
        return self._finished

    @property
    def buffer_capacity(self) -> int:
        """Samples allocated for the internal buffer (bounded while blocks are consumed as they become ready)."""
        return self._buf.shape[0]

    def push(self, pcm: np.ndarray) -> None:
        """Append mono PCM: float32 in [-1, 1], or int16 (scaled by 1/32768); any 1-D length."""
        if self._finished:
            raise RuntimeError("push() after finish(): the stream has ended; start a new AudioWindow")
        if not isinstance(pcm, np.ndarray):
            raise TypeError(f"pcm must be a numpy array, got {type(pcm).__name__}")
        if pcm.ndim != 1:
            raise ValueError(f"pcm must be 1-D mono samples, got shape {pcm.shape}; downmix/flatten it first")
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768.0
        elif pcm.dtype != np.float32:
            raise ValueError(f"pcm must be float32 or int16, got {pcm.dtype}; convert with pcm.astype(np.float32)")
        self._append(pcm)
        self._pushed += pcm.shape[0]

    def finish(self) -> None:
        """End of stream: the last partial block and every lookahead past the end are filled with silence."""
        self._finished = True

    def ready(self) -> bool:
        """Whether ``next_block()`` would return a block now."""
        stream_end = self._buf_start + self._buf_len
        block_start = self._emitted * self.block_samples
        if self._finished:
            return block_start < stream_end
        return stream_end >= block_start + self.block_samples + self.lookahead_samples

    def next_block(self) -> AudioBlock | None:
        """Hand out the next block's window (a fresh array), or None if its samples and lookahead are not in yet."""
        if not self.ready():
            return None
        start = self._emitted * self.block_samples - self.left_samples
        window = np.zeros(self.window_samples, dtype=np.float32)
        lo = max(start, self._buf_start)
        hi = min(start + self.window_samples, self._buf_start + self._buf_len)
        if hi > lo:
            window[lo - start : hi - start] = self._buf[lo - self._buf_start : hi - self._buf_start]
        block = AudioBlock(self._emitted, window, self.left_samples, self.block_samples)
        self._emitted += 1
        return block

    def _append(self, pcm: np.ndarray) -> None:
        """Copy ``pcm`` to the buffer end, first dropping samples no future block needs, growing only if still full."""
        needed = self._buf_len + pcm.shape[0]
        if needed > self._buf.shape[0]:
            keep_from = max(self._buf_start, self._emitted * self.block_samples - self.left_samples)
            drop = keep_from - self._buf_start
            self._buf[: self._buf_len - drop] = self._buf[drop : self._buf_len]
            self._buf_start, self._buf_len = keep_from, self._buf_len - drop
            needed -= drop
            if needed > self._buf.shape[0]:
                grown = np.zeros(max(needed, 2 * self._buf.shape[0]), dtype=np.float32)
                grown[: self._buf_len] = self._buf[: self._buf_len]
                self._buf = grown
        self._buf[self._buf_len : self._buf_len + pcm.shape[0]] = pcm
        self._buf_len += pcm.shape[0]
