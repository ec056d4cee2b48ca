"""Syllable-level mouth shapes from the phonetic content of speech, for the synthetic training data.

:func:`train.synthetic.mouth_track` opens the mouth with the energy envelope, so it opens per phrase and closes only in
pauses. Here each 40 ms video frame is classified from the audio around it the way a phonetician reads a
spectrogram, and the mouth follows the class:

- **vowel** (voiced: a clear pitch period, and within 18 dB of the loud end of speech): the jaw opens with the
  first formant F1 (≈ 300 Hz for i/u, ≈ 750 Hz for a), scaled by loudness; the lips round with a low second
  formant F2 (o/u) and spread with a high one (i/e). Formants come from a linear-prediction (LPC) fit of the frame.
- **consonant** (unvoiced frication or a burst, or voiced but well below the syllable's peak): lips just parted
  (drawn as a closed line).
- **closure** (a dip of 25 dB below the loud end of speech, as at p/b/m, or not speech at all): shut.

Between syllables the level dips and voicing stops, so the mouth closes between the syllables of slow speech and
opens once per syllable: it opens half the way to a vowel's shape per frame and closes faster (70 % of the way to a
consonant's narrow opening per frame, 60 % of the way shut at a closure). The result is exact ground truth
for the renderer, like the envelope track.
"""

from __future__ import annotations

import numpy as np

from model.audio_features import SAMPLE_RATE

FPS = 25
HOP = SAMPLE_RATE // FPS
LPC_ORDER = 12
PITCH_LAGS = (SAMPLE_RATE // 400, SAMPLE_RATE // 70)  # 70-400 Hz


def lpc_formants(seg: np.ndarray) -> tuple[float, float]:
    """(F1, F2) in Hz of one voiced segment by LPC (Levinson-Durbin on the autocorrelation, roots of the predictor);
    formants are resonances with a bandwidth under 500 Hz above 150 Hz. NaN where none is found."""
    x = np.append(seg[0], seg[1:] - 0.63 * seg[:-1]) * np.hamming(seg.size)
    r = np.correlate(x, x, "full")[x.size - 1: x.size + LPC_ORDER]
    if r[0] <= 1e-9:
        return float("nan"), float("nan")
    a = np.zeros(LPC_ORDER + 1)
    a[0], err = 1.0, r[0]
    for i in range(1, LPC_ORDER + 1):
        k = -(r[i] + a[1:i] @ r[i - 1:0:-1]) / err
        a[1:i + 1] = a[1:i + 1] + k * np.append(a[i - 1:0:-1], 1.0)
        err *= 1 - k * k
        if err <= 0:
            break
    roots = np.roots(a)
    roots = roots[np.imag(roots) > 0]
    freq = np.angle(roots) * SAMPLE_RATE / (2 * np.pi)
    bw = -np.log(np.abs(roots)) * SAMPLE_RATE / np.pi
    f = np.sort(freq[(freq > 150) & (bw < 500)])
    return (float(f[0]) if f.size > 0 else float("nan"), float(f[1]) if f.size > 1 else float("nan"))


def voicing(seg: np.ndarray) -> float:
    """Peak normalised autocorrelation over pitch lags of 70-400 Hz (≈ 1 for a vowel, ≈ 0 for noise)."""
    x = seg - seg.mean()
    lo, hi = PITCH_LAGS
    if x.size <= hi:
        return 0.0
    energy = float(x @ x)
    if energy <= 1e-9:
        return 0.0
    return max(float(x[:-lag] @ x[lag:]) / energy * x.size / (x.size - lag) for lag in range(lo, hi, 2))


def viseme_track(audio: np.ndarray, speech: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (openness, roundness) in [0, 1] for 16 kHz ``audio`` with per-sample ``speech`` mask (bool)."""
    pad = np.pad(audio.astype(np.float64), (HOP, 2 * HOP))
    db = np.full(frames, -100.0)
    kind = np.zeros(frames, int)  # 0 closure, 1 consonant, 2 vowel
    jaw = np.zeros(frames)
    rnd = np.zeros(frames)
    is_speech = np.array([bool(speech[min(j * HOP + HOP // 2, len(speech) - 1)]) if len(speech) else False
                          for j in range(frames)])
    segs = [pad[j * HOP + HOP // 2: j * HOP + HOP // 2 + 2 * HOP] for j in range(frames)]
    for j, seg in enumerate(segs):
        db[j] = 10 * np.log10(np.mean(seg * seg) + 1e-10)
    top = np.percentile(db[is_speech], 95) if is_speech.any() else 0.0
    for j, seg in enumerate(segs):
        if not is_speech[j] or db[j] < top - 25:
            continue
        if voicing(seg) > 0.45 and db[j] > top - 18:
            f1, f2 = lpc_formants(seg)
            f1 = 500.0 if np.isnan(f1) else f1
            f2 = 1500.0 if np.isnan(f2) else f2
            loud = np.clip((db[j] - (top - 20)) / 14, 0.4, 1.0)
            jaw[j] = np.clip((f1 - 180) / 420, 0.4, 1.0) * loud
            rnd[j] = np.clip((1700 - f2) / 900, 0.0, 1.0)
            kind[j] = 2
        else:
            jaw[j] = 0.08  # lips just parted: the renderer still draws a closed line
            kind[j] = 1
    opening = np.zeros(frames)
    roundness = np.zeros(frames)
    level = r = 0.0
    for j in range(frames):  # a syllable (≥ 120 ms) opens and closes within it: lips close faster than jaws open
        if kind[j] == 2:
            level += 0.5 * (jaw[j] - level)
        elif kind[j] == 1:
            level += 0.7 * (jaw[j] - level)
        else:
            level = 0.0 if level < 0.08 else 0.4 * level
        r += 0.5 * (rnd[j] - r)
        opening[j], roundness[j] = level, r
    return opening.astype(np.float32), roundness.astype(np.float32)
