"""FP8 (e4m3) KV memory of the streaming DiT: fixed per-(layer, head) scales, saturating writes, dequantising reads.

What is stored. With ``kv_cache_dtype: fp8`` the sink's and every step's KV ring keys and values are e4m3, one
float32 descale per (layer, head) for K and one for V (``x ≈ x_fp8 · descale``), shared by the sink and all the
rings of that layer. The un-roped reference keys (``StepCaches.ref_k``, 1-2 % of the memory) stay in the compute
dtype: they are re-roped for every block and only then rounded, once, into the sink.

Why fixed scales, set at the stream's first sink prefill. A block's K/V are written once and read by many later
blocks, so a scale that moves (a running amax) would leave the entries already written under the old scale wrong,
or force re-quantising the whole ring on every write (the traffic FP8 is meant to halve). A scale fixed at the
first prefill costs nothing per write, keeps CUDA-graph capture simple (the scales are device tensors changed only
in place, before any graph is captured) and needs no host synchronisation. It is taken from the sink, which is
what the stream sees first and is attended by every block:

* K: the largest norm of a RoPE pair per head (:func:`head_amax` with ``rotary=True``). Rotation never makes an
  element exceed its pair's norm, so the reference keys, re-roped at a new position for every block, never
  saturate; V: the largest magnitude per head.
* Both times :data:`KV_HEADROOM` (4): the ring's K/V are computed from noisy latents, not the clean sink. On the
  shipped tiny avatar the ring's per-(layer, head) element amax over 4 s of held-out speech (25 blocks, all four
  steps) stayed within 1.61× the sink's (K) and 1.11× (V); the 14B's real weights are unmeasured. Headroom
  costs no precision for values above 1/7000 of the amax (e4m3's relative precision is the same in every normal
  binade); anything beyond it saturates at ±448 · descale instead of overflowing (the e4m3 cast of an
  out-of-range value would be NaN).

A rolling-sink refresh in the middle of a stream (ring already written) keeps the scales, so the ring stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_fp8 import E4M3, E4M3_MAX, quantize_heads

KV_HEADROOM = 4.0
_MIN_AMAX = 1e-12
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": E4M3}


def kv_storage_dtype(setting: str, compute_dtype: torch.dtype, attention: str) -> torch.dtype:
    """The KV memory's storage dtype for the ``kv_cache_dtype`` setting: 'auto' → e4m3 when ``attention`` is 'fp8'
    (its kernel reads e4m3 K/V directly), else the compute dtype; 'bf16' → bfloat16; 'fp8' → e4m3."""
    if setting == "auto":
        return E4M3 if attention == "fp8" else compute_dtype
    try:
        return KV_DTYPES[setting]
    except KeyError as exc:
        raise ValueError(f"unknown kv_cache_dtype {setting!r}; use 'auto', 'bf16' or 'fp8'") from exc


def head_amax(x: torch.Tensor, rotary: bool = False) -> torch.Tensor:
    """Largest magnitude per head of ``x [..., H, D]`` → float32 ``[H]``; with ``rotary`` the largest norm of a
    RoPE pair (channels 2i, 2i+1), which bounds every element under any rotation."""
    xf = x.float()
    if rotary:
        xf = torch.linalg.vector_norm(xf.unflatten(-1, (-1, 2)), dim=-1)
    return xf.abs().amax(dim=tuple(d for d in range(xf.dim()) if d != xf.dim() - 2))


def kv_descale(x: torch.Tensor, rotary: bool = False) -> torch.Tensor:
    """The fixed per-head descale ``[H]`` for K/V like ``x [..., H, D]``: :func:`head_amax` times
    :data:`KV_HEADROOM`, mapped onto e4m3's largest value 448."""
    return head_amax(x, rotary).clamp(min=_MIN_AMAX) * (KV_HEADROOM / E4M3_MAX)


def quantize_fixed(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``x [..., H, D]`` → e4m3 with a given per-head descale ``[H]``, saturating at ±448 (no NaN for values
    beyond the scale's range). Device ops only: no host synchronisation, shapes fixed (CUDA-graph safe)."""
    return (x.float() / descale.reshape(-1, 1)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize_fixed(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_fixed` in ``dtype`` (multiplied in ``dtype``: one temporary of the result's
    size; bf16's rounding of the product is 1/16 of e4m3's)."""
    return x8.to(dtype).mul_(descale.to(dtype).reshape(-1, 1))


@dataclass(frozen=True)
class StoredKV:
    """One stored key set as attention reads it: K and V ``[B, S, H, D]`` in the storage dtype and, when that is
    e4m3, their per-head float32 descales ``[H]``."""

    k: torch.Tensor
    v: torch.Tensor
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None

    @property
    def is_fp8(self) -> bool:
        """Whether K/V are stored in e4m3 (with descales)."""
        return self.k_descale is not None

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V in ``dtype`` (the stored tensors themselves when already in it)."""
        if self.is_fp8:
            return dequantize_fixed(self.k, self.k_descale, dtype), dequantize_fixed(self.v, self.v_descale, dtype)
        return self.k.to(dtype), self.v.to(dtype)

    def fp8(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k8, v8, k_descale, v_descale)`` for FP8 attention, descales ``[B, H]``: the stored e4m3 tensors as
        they are, or K/V quantised now per (batch, head) when stored in another dtype."""
        if not self.is_fp8:
            k8, k_descale = quantize_heads(self.k)
            v8, v_descale = quantize_heads(self.v)
            return k8, v8, k_descale, v_descale
        b, h = self.k.shape[0], self.k.shape[2]
        return self.k, self.v, self.k_descale.expand(b, h), self.v_descale.expand(b, h)
