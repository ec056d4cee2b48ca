"""The synthetic talking-face generator: exact ground truth that the built-in avatar is trained and judged on."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from train import synthetic as syn


def test_measured_openness_follows_ground_truth_for_every_character():
    rng = np.random.default_rng(0)
    for ch in syn.BUILTIN:
        opening = np.concatenate([np.linspace(0, 1, 12), np.linspace(1, 0, 12)])
        idle = syn.idle_motion(opening.size, rng)
        frames = np.stack([syn.render_frame(ch, syn.FaceState(float(o), 0.3, *m)) for o, m in zip(opening, idle)])
        measured = syn.mouth_openness(frames, ch)
        assert np.corrcoef(measured, opening)[0, 1] > 0.95, ch.name
        assert measured[opening == 0].max() < 0.05, ch.name


def test_mouth_box_holds_the_mouth_at_extreme_sway():
    for ch in syn.BUILTIN:
        for dx, dy in ((syn.MAX_SWAY_X, syn.MAX_SWAY_Y), (-syn.MAX_SWAY_X, -syn.MAX_SWAY_Y)):
            opened = syn.render_frame(ch, syn.FaceState(1.0, 0.0, 0.0, dx, dy, 1.5))
            closed = syn.render_frame(ch, syn.FaceState(0.0, 0.0, 0.0, dx, dy, 1.5))
            changed = np.abs(opened.astype(int) - closed).max(axis=-1) > 0
            x0, y0, x1, y1 = ch.mouth_box()
            assert changed.sum() > 0 and changed[y0:y1, x0:x1].sum() == changed.sum(), ch.name


def test_silence_and_tones_keep_the_mouth_closed_while_idle_motion_goes_on():
    rng = np.random.default_rng(1)
    n = 3 * syn.SAMPLE_RATE
    audio = syn.music_like(n, rng) + rng.normal(0, 1e-3, n).astype(np.float32)
    video, opening = syn.render_clip(syn.BUILTIN[0], audio, np.zeros(n, bool), 75, rng)
    assert opening.max() == 0
    assert syn.mouth_openness(video, syn.BUILTIN[0]).max() < 0.05
    moved = np.abs(video[12:].astype(np.int16) - video[:-12]).mean(axis=(1, 2, 3))
    assert moved.min() > 0  # within any 12 frames the head has moved


def test_openness_tracks_the_energy_of_speech():
    rng = np.random.default_rng(2)
    t = np.arange(2 * syn.SAMPLE_RATE) / syn.SAMPLE_RATE
    env = np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None)
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    audio = (0.3 * env * voiced + 1e-4 * rng.standard_normal(t.size)).astype(np.float32)
    opening, _ = syn.mouth_track(audio, np.ones(t.size, bool), 50)
    level = 10 ** (syn.frame_energy_db(audio, 50) / 20)
    assert np.corrcoef(opening, level)[0, 1] > 0.7


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng + sox")
def test_speech_bank_has_several_voices_at_16k():
    bank = syn.speech_bank(3, seed=0)
    assert len(bank) == 3 and all(b.dtype == np.float32 and b.size > syn.SAMPLE_RATE for b in bank)
    assert len({b.size for b in bank}) == 3


def test_builtin_reference_images_match_the_shipped_pngs():
    from PIL import Image

    from live.images import builtin_characters

    shipped = builtin_characters()
    assert list(shipped) == [ch.name for ch in syn.BUILTIN]
    for ch in syn.BUILTIN:
        png = np.asarray(Image.open(shipped[ch.name]).convert("RGB")).astype(int)
        assert np.abs(png - np.asarray(syn.reference_image(ch)).astype(int)).max() <= 1, ch.name
