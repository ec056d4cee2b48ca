"""Wan 3D rotary position embedding computed from integer positions, with no position table.

Angles are formed in float64 from exact integer positions, so a stream can run for any length ("rolling
RoPE"): there is no table to overflow (upstream's holds 45,000 latent frames) and no precision loss when
absolute frame indices grow large. Head channels are split t / h / w as in Wan: for head_dim 128 that is
44 / 42 / 42 channels (22 / 21 / 21 complex pairs).
"""

from __future__ import annotations

import numpy as np
import torch


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs given to the t, h and w axes (Wan's split)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int, theta: float) -> torch.Tensor:
    dim = 2 * pairs
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 fp16_factors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions ``[S, 3]`` (t, h, w) → two float32 tensors ``[S, head_dim // 2]``.

    Negative positions are allowed (Wan uses the complex conjugate, i.e. a negated angle). ``fp16_factors``
    rounds the factors to float16 first, reproducing Live Avatar's complex32 RoPE table.
    """
    pos = positions.to(torch.float64).cpu()
    parts = []
    for axis, pairs in enumerate(rope_axis_pairs(head_dim)):
        parts.append(torch.outer(pos[:, axis], _inv_freq(pairs, theta)))
    angles = torch.cat(parts, dim=1)
    factor_dtype = torch.float16 if fp16_factors else torch.float32
    return torch.cos(angles).to(factor_dtype).float(), torch.sin(angles).to(factor_dtype).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by per-token angles (``cos``/``sin`` ``[S, D/2]``); computed in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def grid_positions(frames: torch.Tensor | list[int], height: int, width: int,
                   h_index: list[int] | None = None, w_index: list[int] | None = None) -> torch.Tensor:
    """Positions ``[len(frames)*height*width, 3]`` in (t, h, w) order for a token grid flattened as f, h, w.

    ``h_index``/``w_index`` override the spatial indices (FramePack's compressed grids use indices spread over
    the full-resolution range so that coarse tokens line up with full-resolution ones).
    """
    t = torch.as_tensor(frames, dtype=torch.long)
    hi = torch.as_tensor(h_index if h_index is not None else range(height), dtype=torch.long)
    wi = torch.as_tensor(w_index if w_index is not None else range(width), dtype=torch.long)
    tt, hh, ww = torch.meshgrid(t, hi, wi, indexing="ij")
    return torch.stack((tt.flatten(), hh.flatten(), ww.flatten()), dim=1)


def spread_indices(count: int, full: int) -> list[int]:
    """``count`` integer indices spread over ``[0, full)`` the way upstream's ``rope_precompute`` does
    (``np.linspace(0, full - 1, count).astype(int)``: truncation, not rounding)."""
    return np.linspace(0, full - 1, count).astype(int).tolist()
