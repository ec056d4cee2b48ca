"""The model stack as training uses it: built like ``ModelStack.load`` (seeded, float32), made differentiable,
and written out as the one weights file the tiny profile loads."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from model.stack import ModelStack
from train.profile import TrainingProfile


def build_stack(profile: TrainingProfile, device: torch.device) -> ModelStack:
    """The random stack exactly as ``ModelStack.load`` builds it (seeded), in float32 on ``device``."""
    options = dataclasses.replace(profile.options, weights=None, device="cpu", dtype="float32", threads=0)
    stack = ModelStack.load(profile.model, options)
    stock_vae_(stack.vae, cpu=device.type == "cpu")
    for m in (stack.dit, stack.vae, stack.wav2vec2, stack.text_encoder):
        m.to(device)
    return stack


def stock_vae_(vae: torch.nn.Module, cpu: bool = False) -> torch.nn.Module:
    """Give every VAE module back its diffusers class: ``ModelStack.load`` on CPU swaps in inference-only fast paths
    (model/vae_cpu.py), while training needs differentiable maths on any device. With ``cpu`` the causal convs
    become ``_StackedConv3d`` (differentiable, and ~20x faster than PyTorch's CPU conv3d for a few channels).
    Parameters are untouched (only classes change)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    stock = {v for v in vars(wan).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)}
    for module in vae.modules():
        if type(module) not in stock:
            base = next((c for c in type(module).__mro__ if c in stock), None)
            if base is not None:
                module.__class__ = base
        if cpu and type(module) is wan.WanCausalConv3d:
            module.__class__ = _stacked_conv_class()
    return vae


@functools.cache
def _stacked_conv_class() -> type:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    class _StackedConv3d(WanCausalConv3d):
        """A causal conv (temporal stride 1) as one ``conv2d`` over its ``kt`` input frames stacked along channels:
        PyTorch's CPU ``conv3d`` takes a naive kernel for these few-channel shapes. Same values, differentiable."""

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
            stacked = x.unfold(2, kt, 1).permute(0, 2, 1, 5, 3, 4).reshape(b * frames, c * kt, h, w)
            weight = self.weight.reshape(self.out_channels, c * kt, *self.kernel_size[1:])
            out = F.conv2d(stacked, weight, self.bias, stride=self.stride[1:])
            return out.unflatten(0, (b, frames)).transpose(1, 2)

    return _StackedConv3d


def save_weights(path: Path, stack: ModelStack) -> None:
    """One safetensors file: ``dit.`` / ``vae.`` / ``wav2vec2.`` / ``text.`` prefixed float32 tensors."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("dit", stack.dit), ("vae", stack.vae), ("wav2vec2", stack.wav2vec2),
                           ("text", stack.text_encoder)):
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
