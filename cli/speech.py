"""Speech-like test audio for the benchmarks: generated, and written as a 16 kHz WAV a client can send."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from model.audio_features import SAMPLE_RATE


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """16 kHz mono float32: a voiced tone with harmonics, gated into syllables of 120–250 ms with pauses, plus
    breath noise — speech's energy envelope and spectrum shape, without a TTS engine."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.12, 0.25) * SAMPLE_RATE)
        seg = np.hanning(length)[: n - pos]
        env[pos:pos + seg.size] = seg * rng.uniform(0.3, 1.0)
        pos += length + int(rng.uniform(0.02, 0.15) * SAMPLE_RATE)
    out = 0.2 * env * voice + 0.01 * rng.standard_normal(n)
    return out.astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """``pcm`` (float32, 16 kHz mono) as a 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())
