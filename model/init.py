"""Seeded random initialisation for real-size architectures without checkpoints (benchmarks, smoke runs)."""

from __future__ import annotations

import torch
from torch import nn


def build_random(factory, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Construct ``factory()`` on the meta device, materialise it on ``device``/``dtype`` and fill it with
    seeded random values — so a 16B-parameter model never exists in fp32 or on the host."""
    with torch.device("meta"):
        module = factory().to(dtype)  # cast on meta: materialising in fp32 first would double peak memory
    module = module.to_empty(device=device)
    init_random_(module, seed)
    return module


@torch.no_grad()
def init_random_(module: nn.Module, seed: int) -> None:
    """Norm weights 1, biases 0, every other tensor N(0, 1/fan_in) — deterministic for a seed and device."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    for mod_name, mod in module.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif name == "weight" and (isinstance(mod, norm_types) or "norm" in mod_name.rsplit(".", 1)[-1]):
                param.fill_(1.0)
            else:
                fan_in = param[0].numel() if param.ndim >= 2 else param.numel()
                param.normal_(0.0, fan_in**-0.5, generator=gen)
