"""CPU speed-up for the tiny Wan VAE: causal 3-D convolutions evaluated as one 2-D convolution.

PyTorch sends a batch-1 ``conv3d`` whose ``N·C·T·H`` is at most 20480 to its naive ``slow_conv3d`` kernel rather
than oneDNN (a heuristic written for 2-D inputs), which makes the few-channel convs of a tiny VAE ~20× slower
than their arithmetic. A causal conv with kernel ``kt×kh×kw`` and temporal stride 1 equals a 2-D conv over the
``kt`` input frames stacked along channels, which oneDNN runs. The module stays a diffusers
``WanCausalConv3d`` with the same parameters (state dict unchanged); only its forward changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
from torch import nn


class StackedCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` computed as ``conv2d`` over time-stacked frames (same result, oneDNN kernel)."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if self.stride[0] != 1 or self.dilation != (1, 1, 1) or self.groups != 1:
            return super().forward(x, cache_x)
        padding = list(self._padding)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = F.pad(x, padding)
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        frames = t - kt + 1
        # channels-last (NHWC) operands: oneDNN's fastest layout for few channels, and no reorder per call
        if kt == 1:
            stacked = x.permute(0, 2, 3, 4, 1).reshape(b * frames, h, w, c)
        else:
            stacked = x.unfold(2, kt, 1).permute(0, 2, 3, 4, 5, 1).reshape(b * frames, h, w, kt * c)
        weight = self.weight.permute(0, 3, 4, 2, 1).reshape(self.out_channels, *self.kernel_size[1:], kt * c)
        out = F.conv2d(stacked.permute(0, 3, 1, 2), weight.permute(0, 3, 1, 2), self.bias, stride=self.stride[1:])
        return out.unflatten(0, (b, frames)).transpose(1, 2)


class FastRMSNorm(WanRMS_norm):
    """``WanRMS_norm`` with the channel norm as a sum of squares (``F.normalize`` over a strided channel dim of a
    few channels is slow on CPU); same maths, eps as ``F.normalize`` (1e-12 on the norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_first or x.dtype != torch.float32:
            return super().forward(x)
        norm = x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        return x / norm * (self.scale * self.gamma) + self.bias


def speed_up_vae_(vae: nn.Module) -> nn.Module:
    """Swap the forward of every causal conv and RMS norm in ``vae`` for the CPU-friendly one, in place."""
    for module in vae.modules():
        if type(module) is WanCausalConv3d:
            module.__class__ = StackedCausalConv3d
        elif type(module) is WanRMS_norm:
            module.__class__ = FastRMSNorm
    return vae
