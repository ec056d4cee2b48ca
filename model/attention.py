"""Attention kernels of the DiT: softmax attention that also returns the log-sum-exp, the exact merge of two
such attentions over disjoint key sets, and the SDPA backend preference on CUDA.

The streaming DiT attends a block's queries to [sink | ring] as two attentions merged by their log-sum-exp, so
neither key set is ever concatenated. Which LSE-returning CUDA kernel works (cuDNN, FlashAttention,
memory-efficient) depends on the GPU and torch version, so :class:`LseAttention` probes once per dtype and keeps
its choice on the instance (each model owns one; nothing is global). :class:`StreamAttention` routes the DiT's
streaming self-attention to it or, per layer, to FP8 attention (:mod:`model.attention_fp8`) over the stored K/V.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .attention_fp8 import CudnnFP8Attention, quantize_query, sdpa_fp8_reference
from .kv_fp8 import StoredKV

LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

CUDA_LSE_KERNELS: dict[str, LseKernel] = {
    "cudnn": lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2],
    "flash": lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2],
    "efficient": lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2],
}
PROBE_TOLERANCE = 2e-2


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two key sets from the attentions over each: the outputs weighted by their
    share of the total softmax mass, ``sigmoid(lse1 - lse2)`` (exact; float32)."""
    w = torch.sigmoid(lse1 - lse2).unsqueeze(-1)
    o2 = o2.float()
    return o2 + (o1.float() - o2) * w


class LseAttention:
    """Softmax attention of ``[B, H, L, D]`` inputs → (output ``[B, H, Lq, D]``, natural-log sum-exp of the
    scaled scores ``[B, H, Lq]`` float32). The log-sum-exp lets two attentions over disjoint key sets be merged
    exactly (:func:`merge_attention`).

    On CUDA the first kernel of :data:`CUDA_LSE_KERNELS` that runs here and whose merged result matches plain
    attention is chosen once per dtype on random data; a kernel that later refuses some shapes or strides is
    dropped and the next one is chosen."""

    def __init__(self) -> None:
        self._choice: dict[torch.dtype, str] = {}
        self._failed: set[str] = set()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lq = q.shape[2]
        if q.is_cuda:
            while True:
                name = self.backend(q.dtype)
                try:
                    out, lse = CUDA_LSE_KERNELS[name](q, k, v)
                    break
                except RuntimeError:
                    self._failed.add(name)
                    self._choice.pop(q.dtype)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., :lq].float()

    def backend(self, dtype: torch.dtype) -> str:
        """The CUDA kernel used for ``dtype`` (probed on first use); raises when none works."""
        if dtype not in self._choice:
            self._choice[dtype] = self._probe(dtype)
        return self._choice[dtype]

    def _probe(self, dtype: torch.dtype) -> str:
        gen = torch.Generator(device="cuda").manual_seed(0)
        # [B, S, H, D] storage viewed as [B, H, S, D], the layout the DiT passes
        q, k1, k2, v1, v2 = (torch.randn(1, n, 4, 128, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
                             for n in (192, 160, 320, 160, 320))
        ref = F.scaled_dot_product_attention(q.float(), torch.cat([k1, k2], 2).float(), torch.cat([v1, v2], 2).float())
        errors = {}
        for name, fn in CUDA_LSE_KERNELS.items():
            if name in self._failed:
                continue
            try:
                (o1, l1), (o2, l2) = fn(q, k1, v1), fn(q, k2, v2)
                b, h, lq = q.shape[:3]
                got = merge_attention(o1, l1.reshape(b, h, -1)[..., :lq].float(), o2, l2.reshape(b, h, -1)[..., :lq].float())
                err = float((got - ref).norm() / ref.norm())
            except RuntimeError as exc:
                errors[name] = str(exc).splitlines()[0]
                continue
            if err < PROBE_TOLERANCE:
                return name
            errors[name] = f"relative error {err:.3g}"
        raise RuntimeError(f"no CUDA attention kernel with log-sum-exp works for {dtype}: {errors}")


ATTENTION_MODES = ("dtype", "fp8")


def resolve_attention(setting: str) -> str:
    """The self-attention mode for the ``attention`` setting: 'auto' → 'dtype' (FP8 attention is opt-in until it is
    validated on real weights; bench/RESULTS.md), else the setting itself."""
    mode = "dtype" if setting == "auto" else setting
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {setting!r}; use 'auto', 'dtype' or 'fp8'")
    return mode


class StreamAttention:
    """The DiT's streaming self-attention: a block's queries ``[B, Sq, H, D]`` over one stored key set (the sink or
    one step's ring, :class:`model.kv_fp8.StoredKV`) → (output ``[B, H, Sq, D]``, log-sum-exp ``[B, H, Sq]``
    float32), the two halves :func:`merge_attention` combines.

    ``mode='dtype'``: :class:`LseAttention` in the queries' dtype; K/V stored in e4m3 are dequantised first.
    ``mode='fp8'``: e4m3 attention in every layer except ``skip_layers`` (indices, negative from the end): stored
    e4m3 K/V go to the kernel as they are (other K/V are quantised per call), queries are quantised per call; on
    CUDA through :class:`model.attention_fp8.CudnnFP8Attention` (Hopper; see :func:`model.attention_fp8.check_fp8_attention`),
    elsewhere through :func:`model.attention_fp8.sdpa_fp8_reference` (dequantise, float32 attention: the maths
    without the kernel's rounding of P and O, for CPU tests). Text cross-attention and the audio injectors never
    come here and stay in the compute dtype."""

    def __init__(self, mode: str = "dtype", skip_layers: Iterable[int] = (), num_layers: int = 0) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {mode!r}; use one of {ATTENTION_MODES}")
        skip = set()
        for layer in skip_layers:
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"fp8_attention_skip_layers: layer {layer} is outside a {num_layers}-layer DiT "
                                 f"(use 0..{num_layers - 1}, or negative indices from the end)")
            skip.add(layer % num_layers)
        self.mode = mode
        self.fp8_layers = frozenset(range(num_layers)) - skip if mode == "fp8" else frozenset()
        self.lse = LseAttention()
        self.cudnn = CudnnFP8Attention() if self.fp8_layers else None

    @property
    def builds_plans(self) -> bool:
        """Whether a CUDA call may build a cuDNN FP8 plan for a new shape, which synchronises the device: run one
        eager step of a shape before capturing it in a CUDA graph."""
        return bool(self.fp8_layers)

    def __call__(self, layer: int, q: torch.Tensor, kv: StoredKV) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.fp8_layers:
            return self._fp8(q, kv)
        k, v = kv.dense(q.dtype)
        return self.lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def _fp8(self, q: torch.Tensor, kv: StoredKV) -> tuple[torch.Tensor, torch.Tensor]:
        k8, v8, k_descale, v_descale = kv.fp8()
        if q.is_cuda:
            q8, q_descale, k_descale = quantize_query(q, k_descale, self.cudnn.per_head_qk(q.device))
            out, lse = self.cudnn(q8, k8, v8, q_descale, k_descale, v_descale, return_lse=True, out_dtype=q.dtype)
        else:
            q8, q_descale, k_descale = quantize_query(q, k_descale)
            out, lse = sdpa_fp8_reference(q8, k8, v8, q_descale, k_descale, v_descale, return_lse=True,
                                          out_dtype=q.dtype)
        return out.transpose(1, 2), lse


def sdpa_backends(device: torch.device):
    """Context preferring cuDNN attention (then FlashAttention) on CUDA, as upstream does on Hopper."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
