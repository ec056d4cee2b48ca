"""Rendered training clips shared by the stages: the cast of characters, a worker pool that renders frames, the
reference-first talking clip, video tensors and the loss weight of the mouth (and eyes)."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
from multiprocessing.pool import Pool

import numpy as np
import torch

from train import synthetic as syn

_POOL: Pool | None = None


def characters(seed: int, extra: int, size: int = syn.SIZE) -> list[syn.Character]:
    """The built-in characters and ``extra`` random ones (seeded), drawn at ``size`` × ``size``."""
    rng = np.random.default_rng(seed + 7)
    cast = list(syn.BUILTIN) + [syn.random_character(rng, f"rand{i}") for i in range(extra)]
    return [dataclasses.replace(ch, size=size) for ch in cast]


def worker_pool(workers: int) -> Pool:
    """The process pool (forked once, ``workers`` processes) that renders frames for every stage."""
    global _POOL
    if _POOL is None:
        _POOL = mp.get_context("fork").Pool(max(1, workers))
    return _POOL


def close_worker_pool() -> None:
    """Terminate the pool of :func:`worker_pool`, if one was started."""
    global _POOL
    if _POOL is not None:
        _POOL.terminate()
        _POOL = None


def data_clip_job(ch: syn.Character, audio: np.ndarray, speech: np.ndarray, frames: int,
                  seed: int, track: str = "envelope") -> tuple[np.ndarray, np.ndarray]:
    """A talking clip of ``frames`` frames with the reference image first (``[1 + frames, H, W, 3]`` uint8) and its
    ground-truth mouth opening per frame (the mouth following ``track``)."""
    video, opening = syn.render_clip(ch, audio, speech, frames, np.random.default_rng(seed), track)
    ref = np.asarray(syn.reference_image(ch))
    return np.concatenate([ref[None], video]), opening


def to_video(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → float [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def feature_weight(chars: list[syn.Character], idx: list[int], device: torch.device, mouth: float = 8.0,
                   features: float = 3.0) -> torch.Tensor:
    """Per-pixel loss weight ``[B, 1, 1, H, W]`` of clips of characters ``chars[i]`` in any pose: ``mouth`` in the
    mouth box, ``features`` wherever the eyes, brows, nose or accessories can be drawn (their strokes at rest,
    widened by the largest sway), 1 elsewhere."""
    return torch.stack([_feature_weight(chars[i], mouth, features) for i in idx]).to(device)[:, None, None]


@functools.cache
def _feature_weight(ch: syn.Character, mouth: float, features: float) -> torch.Tensor:
    _, masks = syn.feature_masks(ch, syn.FaceState())
    strokes = torch.from_numpy(np.max([m for name, m in masks.items() if name != "mouth"], axis=0) > 0.1).float()
    rx, ry = (round(v * ch.unit) + 1 for v in (syn.MAX_SWAY_X, syn.MAX_SWAY_Y + 1))
    reach = torch.nn.functional.max_pool2d(strokes[None, None], (2 * ry + 1, 2 * rx + 1), 1, (ry, rx))[0, 0]
    w = 1 + (features - 1) * reach
    x0, y0, x1, y1 = ch.mouth_box()
    w[y0:y1, x0:x1] = mouth
    return w
