"""wav2vec2 hidden states → one feature per video frame, for one block's audio window.

Upstream encodes a whole file: all hidden states at 50 Hz, linearly resampled to 30 Hz, then sampled at the
video fps with rounded indices. For streaming we evaluate the same mapping per frame: video frame J (absolute,
since stream start) reads the 30 Hz index ``round(J * 30 / fps)``, i.e. 50 Hz position ``round(J*30/fps)*5/3``,
linearly interpolated between the two nearest wav2vec2 frames of the block's window. The window has a fixed
length, so the features of a block depend only on its own window (causality is the window's business).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from .config import Wav2Vec2Size

WAV2VEC_RATE = 50
WAV2VEC_HOP = 320
FEATURE_RATE = 30

SAMPLE_RATE = 16000  # wav2vec2 hears 16 kHz mono: the one audio rate of the whole system (mic in, engine, output)


def build_wav2vec2(size: Wav2Vec2Size) -> Wav2Vec2Model:
    """A randomly initialised wav2vec2 (layer-norm "stable" variant, as XLSR-53) of the given size."""
    cfg = Wav2Vec2Config(
        hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, intermediate_size=size.intermediate_size,
        conv_dim=tuple(size.conv_dim), num_conv_pos_embeddings=size.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=size.num_conv_pos_embedding_groups, feat_extract_norm="layer",
        do_stable_layer_norm=True, vocab_size=32)
    return Wav2Vec2Model(cfg).eval()


def frame_taps(window_start: int, first_frame: int, num_frames: int, fps: int, t50: int
               ) -> tuple[list[int], list[int], list[float]]:
    """Where video frames ``first_frame …`` read a window's 50 Hz hidden states: per frame the two neighbouring
    wav2vec2 frames ``lo``, ``hi`` and the weight ``a`` of ``hi`` (upstream's 30 Hz grid sampled at ``fps``)."""
    if window_start % WAV2VEC_HOP:
        raise ValueError(f"window start {window_start} is not a multiple of {WAV2VEC_HOP} samples")
    offset = window_start // WAV2VEC_HOP
    lo_idx, hi_idx, weights = [], [], []
    for j in range(first_frame, first_frame + num_frames):
        pos = round(j * FEATURE_RATE / fps) * WAV2VEC_RATE / FEATURE_RATE - offset
        pos = min(max(pos, 0.0), t50 - 1.0)
        lo = math.floor(pos)
        lo_idx.append(lo)
        hi_idx.append(min(lo + 1, t50 - 1))
        weights.append(pos - lo)
    return lo_idx, hi_idx, weights


def window_features(wav2vec2: Wav2Vec2Model, windows: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-frame features of a batch of equal-length windows ``[B, S]`` (differentiable: train-tiny trains the tiny
    wav2vec2 through it). ``taps`` = ``(lo, hi, a)`` of shape ``[B, F]`` from :func:`frame_taps`. Each window is
    normalised to zero mean and unit variance, as upstream does per file. Returns ``[B, L, C, F]``."""
    x = (windows - windows.mean(-1, keepdim=True)) / torch.sqrt(windows.var(-1, unbiased=False, keepdim=True) + 1e-7)
    x = x.to(next(wav2vec2.parameters()).dtype)
    hidden = torch.stack(wav2vec2(x, output_hidden_states=True).hidden_states, dim=1)  # [B, L, T50, C]
    lo, hi, a = taps
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    h = hidden.permute(0, 2, 1, 3)  # [B, T50, L, C]
    mixed = h[rows, lo] * (1 - a)[..., None, None] + h[rows, hi] * a[..., None, None]  # [B, F, L, C]
    return mixed.permute(0, 2, 3, 1)


def num_hidden_frames(wav2vec2: Wav2Vec2Model, samples: int) -> int:
    """How many 50 Hz hidden states wav2vec2 gives for a window of ``samples``."""
    return int(wav2vec2._get_feat_extract_output_lengths(torch.tensor(samples)))


class FrameAudioFeatures:
    """Turns a block's audio window into ``[1, num_hidden_states, hidden, frames]`` per-frame features."""

    def __init__(self, wav2vec2: Wav2Vec2Model, sample_rate: int = SAMPLE_RATE, fps: int = 25) -> None:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"wav2vec2 needs 16 kHz audio, got {sample_rate} Hz")
        self.wav2vec2 = wav2vec2
        self.fps = fps

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, window_start: int, first_frame: int, num_frames: int) -> torch.Tensor:
        """Features of video frames ``first_frame … first_frame+num_frames-1``.

        ``samples`` is the window (float32 mono 16 kHz); ``window_start`` its first sample's index in stream
        time (may be negative: leading zeros), and must be a multiple of the 320-sample wav2vec2 hop.
        """
        p = next(self.wav2vec2.parameters())
        t50 = num_hidden_frames(self.wav2vec2, len(samples))
        taps = frame_taps(window_start, first_frame, num_frames, self.fps, t50)
        lo, hi = (torch.tensor([t], device=p.device) for t in taps[:2])
        a = torch.tensor([taps[2]], device=p.device, dtype=p.dtype)
        x = torch.as_tensor(samples, dtype=torch.float32)[None].to(p.device)
        return window_features(self.wav2vec2, x, (lo, hi, a)).float()
