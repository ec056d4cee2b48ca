"""Does the built-in avatar keep its face? Per facial feature, how much of its contrast an output frame keeps.

For a character and a feature (:data:`train.synthetic.FEATURES`), the feature's box is where the renderer draws it
at rest, widened by the largest head sway. A frame's *contrast* there is the standard deviation of its pixels (RGB,
0–255) inside the box; the feature's *retention* is that contrast over the reference image's. Eyes, brows, the lip
line, the nose and accessories are what carry the contrast of their boxes, so a feature that fades into skin drives
its retention towards the skin's own (a few percent), while an open mouth or a blink changes it only briefly: the
retention of a stretch of frames is their median. 1.0 means as crisp as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train import synthetic as syn


@dataclass(frozen=True)
class FeatureBoxes:
    """Pixel boxes ``(x0, y0, x1, y1)`` per feature of one character, and the reference contrast in each."""

    boxes: dict[str, tuple[int, int, int, int]]
    reference: dict[str, float]


def feature_boxes(ch: syn.Character) -> FeatureBoxes:
    """The boxes of ``ch``'s features drawn at rest (features it does not have are left out)."""
    frame, masks = syn.feature_masks(ch, syn.FaceState())
    mx, my = (round((m + 1) * ch.unit) for m in (syn.MAX_SWAY_X, syn.MAX_SWAY_Y + 1.5 * 0.4))
    boxes = {}
    for name, mask in masks.items():
        ys, xs = np.nonzero(mask > 0.25)
        if ys.size == 0:
            continue
        boxes[name] = (max(int(xs.min()) - mx, 0), max(int(ys.min()) - my, 0),
                       min(int(xs.max()) + 1 + mx, ch.size), min(int(ys.max()) + 1 + my, ch.size))
    return FeatureBoxes(boxes, {name: _contrast(frame[None], box)[0] for name, box in boxes.items()})


def _contrast(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frames[:, y0:y1, x0:x1].reshape(frames.shape[0], -1, 3).astype(np.float32).std(axis=1).mean(axis=1)


def retention(frames: np.ndarray, ch: syn.Character, window: int = 25) -> dict[str, np.ndarray]:
    """Per feature, the median retention of each ``window`` frames of ``frames`` (``[n, H, W, 3]`` uint8)."""
    fb = feature_boxes(ch)
    out = {}
    for name, box in fb.boxes.items():
        ratio = _contrast(frames, box) / max(fb.reference[name], 1e-6)
        n = len(ratio) // window
        out[name] = np.median(ratio[: n * window].reshape(n, window), axis=1)
    return out
