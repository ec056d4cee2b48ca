"""Attention kernels of the DiT: softmax attention that also returns the log-sum-exp, the exact merge of two
such attentions over disjoint key sets, and the SDPA backend preference on CUDA.

The streaming DiT attends a block's queries to [sink | ring] as two attentions merged by their log-sum-exp, so
neither key set is ever concatenated. Which LSE-returning CUDA kernel works (cuDNN, FlashAttention,
memory-efficient) depends on the GPU and torch version, so :class:`LseAttention` probes once per dtype and keeps
its choice on the instance (each model owns one; nothing is global).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def sdpa_backends(device: torch.device):
    """Context preferring cuDNN attention (then FlashAttention) on CUDA, as upstream does on Hopper."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
