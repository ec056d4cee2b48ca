"""FP8 (e4m3) linear layers for the DiT: weights quantised once at load, activations per call.

Upstream Live Avatar's ``--fp8`` swaps every ``nn.Linear`` for a per-tensor-scaled ``torch._scaled_mm`` layer
except the text/time embeddings, ``head.head`` and the audio encoder's ``final_linear`` (model-facts §15).
:func:`quantize_dit_` does the same for the transformer blocks and audio injectors — the layers that hold
~98% of the weights and FLOPs — with per-row weight scales and per-token activation scales by default (at
least as accurate as per-tensor, and robust to outlier tokens). The bf16 weight is dropped as each layer is
converted, so no second copy exists. On CUDA the product is one ``torch._scaled_mm``; elsewhere the same
quantised operands are multiplied in float32, which is what the CPU tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_MIN_AMAX = 1e-12

QUANTIZED_PREFIXES = ("blocks.", "audio_injector.")
EXEMPT = ("text_embedding", "time_embedding", "time_projection", "head.head", "casual_audio_encoder.encoder.final_linear")


def quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → (e4m3 values, float32 scales) with ``x ≈ q * scale``; scales ``[M, 1]`` per row, or a
    single-element tensor per tensor. Each scale maps the row's (tensor's) largest magnitude onto 448."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax().reshape(1, 1)
    scale = amax.float().clamp(min=_MIN_AMAX) / E4M3_MAX
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale  # x / float32 scale is computed in float32


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to the rounding it did)."""
    return (q.float() * scale).to(dtype)


class FP8Linear(nn.Module):
    """``y = x Wᵀ + b`` with e4m3 ``W`` (quantised once) and e4m3 ``x`` (quantised per call), float32 scales.

    ``weight`` stays ``[out, in]`` row-major, which ``torch._scaled_mm`` reads as the column-major right operand
    it requires (``weight.t()``). Output and bias are in ``compute_dtype`` (the model's bf16).
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype, rowwise: bool = True,
                 bias: bool = True, device: torch.device | None = None) -> None:
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 GEMMs need both sides divisible by 16, got {in_features}x{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.rowwise = rowwise
        scale_shape = (out_features, 1) if rowwise else (1, 1)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rowwise: bool = True) -> "FP8Linear":
        """Quantise ``linear``'s weight (its dtype becomes the compute dtype)."""
        dt = linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, dt, rowwise, linear.bias is not None, linear.weight.device)
        q, scale = quantize(linear.weight, rowwise)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scales={'row' if self.rowwise else 'tensor'}, compute_dtype={self.compute_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize(x2, self.rowwise)
        if x.is_cuda:
            out = _scaled_mm(xq, self.weight, xs, self.weight_scale, self.bias, self.compute_dtype, self.rowwise)
        else:
            w = dequantize(self.weight, self.weight_scale)
            b = None if self.bias is None else self.bias.float()
            out = F.linear(dequantize(xq, xs), w, b).to(self.compute_dtype)
        return out.reshape(*lead, self.out_features)


# Whether torch._scaled_mm takes the bias (some torch builds refuse it with row-wise scales; then it is added
# after the product). Settled by the first call.
_BIAS_IN_GEMM: bool | None = None
# cuBLAS "fast accumulation" (fewer promotions of FP8 partial sums to full precision): 10-15% faster GEMMs on
# H100 at the DiT's shapes (bench/RESULTS.md); relative error stays near 1e-3 of the exact FP8 product.
FAST_ACCUM = True


def _scaled_mm(xq: torch.Tensor, wq: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """``(xq·xs) (wq·ws)ᵀ + bias`` through ``torch._scaled_mm``. Row-wise scales are ``[M, 1]`` and ``[1, N]``;
    rows are zero-padded to a multiple of 16 (only tiny M, such as the injectors' per-frame AdaLN, needs it)."""
    global _BIAS_IN_GEMM
    m = xq.shape[0]
    pad = -m % 16
    if pad:
        xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
        if rowwise:
            xs = F.pad(xs, (0, 0, 0, pad), value=1.0)
    scale_a, scale_b = (xs, ws.reshape(1, -1)) if rowwise else (xs.reshape(()), ws.reshape(()))

    def mm(b: torch.Tensor | None) -> torch.Tensor:
        return torch._scaled_mm(xq, wq.t(), scale_a=scale_a, scale_b=scale_b, bias=b, out_dtype=out_dtype,
                                use_fast_accum=FAST_ACCUM)

    if bias is None:
        out = mm(None)
    elif _BIAS_IN_GEMM is None:
        try:
            out = mm(bias)
            _BIAS_IN_GEMM = True
        except RuntimeError:
            _BIAS_IN_GEMM = False
            out = mm(None) + bias
    else:
        out = mm(bias) if _BIAS_IN_GEMM else mm(None) + bias
    return out[:m] if pad else out


def quantize_dit_(dit: nn.Module, rowwise: bool = True) -> int:
    """Replace the ``nn.Linear`` layers of the transformer blocks and audio injectors with :class:`FP8Linear`
    in place, one at a time (each bf16 weight is freed as soon as its FP8 copy exists). Returns how many."""
    count = 0
    for name, module in list(dit.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (isinstance(child, nn.Linear) and full.startswith(QUANTIZED_PREFIXES)
                    and not any(full.startswith(e) for e in EXEMPT)):
                setattr(module, child_name, FP8Linear.from_linear(child, rowwise))
                del child
                count += 1
    return count
