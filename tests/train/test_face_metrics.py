"""The face-keeping metric (train/face_metrics.py): crisp renders keep every feature, a faded face does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from train import face_metrics
from train import synthetic as syn


@pytest.mark.parametrize("size", [192, 256])
def test_ground_truth_frames_keep_every_feature_and_a_faded_face_does_not(size):
    rng = np.random.default_rng(0)
    for base in syn.BUILTIN:
        ch = dataclasses.replace(base, size=size)
        idle = syn.idle_motion(25, rng)
        frames = np.stack([syn.render_frame(ch, syn.FaceState(0.0, 0.0, *m)) for m in idle])
        kept = face_metrics.retention(frames, ch)
        assert set(kept) >= {"eyes", "mouth", "nose", "brows"}, ch.name
        for name, values in kept.items():
            # sway moves strokes across pixel edges (a 2 px stroke between pixels is paler) and things into the box
            assert 0.6 <= values.min() and values.max() <= 1.35, (ch.name, name, values)
        # the same frames smoothed the way a too-small VAE smooths thin strokes
        faded = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(3 * ch.unit))) for f in frames])
        lost = face_metrics.retention(faded, ch)
        for name in ("eyes", "mouth", "nose", "brows"):
            assert lost[name].max() < 0.75 * kept[name].min(), (ch.name, name, lost[name], kept[name])
