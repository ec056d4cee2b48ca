"""Syllable-level mouth shapes (train/visemes.py): formants of known vowels, one opening per syllable."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from train import synthetic as syn
from train.visemes import lpc_formants, viseme_track


def _vowel(f1: float, f2: float, seconds: float = 0.25, pitch: float = 160.0) -> np.ndarray:
    """A pulse train at ``pitch`` through resonators at F1, F2 and 2.5 kHz (a textbook synthetic vowel)."""
    n = int(seconds * syn.SAMPLE_RATE)
    x = np.zeros(n)
    x[:: int(syn.SAMPLE_RATE / pitch)] = 1.0
    for f, bw in ((f1, 80.0), (f2, 100.0), (2500.0, 150.0)):
        r, th = np.exp(-np.pi * bw / syn.SAMPLE_RATE), 2 * np.pi * f / syn.SAMPLE_RATE
        y = np.zeros(n)
        for i in range(n):
            y[i] = x[i] + 2 * r * np.cos(th) * (y[i - 1] if i else 0) - r * r * (y[i - 2] if i > 1 else 0)
        x = y
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize(("f1", "f2"), [(730, 1090), (270, 2290), (300, 870)], ids=["a", "i", "u"])
def test_formants_of_synthetic_vowels(f1, f2):
    got = lpc_formants(_vowel(f1, f2)[1000:1640].astype(np.float64))
    assert got == pytest.approx((f1, f2), rel=0.1)


def test_open_vowels_open_wider_and_rounded_ones_round():
    pause = np.zeros(syn.SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([pause, _vowel(730, 1090), pause, _vowel(270, 2290), pause, _vowel(300, 870), pause])
    frames = audio.size // (syn.SAMPLE_RATE // syn.FPS)
    opening, roundness = viseme_track(audio, np.abs(audio) >= 0, frames)
    peaks = [opening[a:a + 7].max() for a in (12 + 2, 31 + 2, 50 + 2)]  # the three vowels' frames
    rounds = [roundness[a:a + 7].max() for a in (12 + 2, 31 + 2, 50 + 2)]
    assert peaks[0] > peaks[1] and peaks[0] > peaks[2], peaks  # a opens wider than i and u
    assert rounds[2] > 0.5 > rounds[1], rounds  # u rounds, i spreads
    assert opening[:10].max() == 0 and opening[-8:].max() < 0.05  # shut in the pauses


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng + sox")
def test_the_mouth_closes_between_the_syllables_of_slow_speech():
    pcm = syn.espeak("one two three four five", "en", speed=90)
    frames = pcm.size // (syn.SAMPLE_RATE // syn.FPS)
    opening, _ = viseme_track(pcm, np.ones(pcm.size, bool), frames)
    envelope, _ = syn.mouth_track(pcm, np.ones(pcm.size, bool), frames)

    def syllables(track: np.ndarray) -> int:
        """Openings above 0.3 separated by a closure below 0.1."""
        count, closed = 0, True
        for v in track:
            if v > 0.3 and closed:
                count, closed = count + 1, False
            elif v < 0.1:
                closed = True
        return count

    assert syllables(opening) >= 4  # five words, four gaps between them
    assert syllables(opening) > syllables(envelope)  # the energy envelope runs words together
