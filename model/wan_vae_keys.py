"""Key names of the Wan2.1 VAE: Wan's own layout (``Wan2.1_VAE.pth``, ``WanVAE_``) ↔ diffusers ``AutoencoderKLWan``.

Wan keeps its encoder and decoder stages in two flat ``nn.Sequential`` lists (``encoder.downsamples.K``,
``decoder.upsamples.K``); diffusers keeps the encoder flat (``encoder.down_blocks.K``) but groups the decoder into
stages (``decoder.up_blocks.I.resnets.J`` / ``.upsamplers.0``), and renames the residual-block internals. The
module map below is built from the architecture, so it holds for any ``VAEConfig`` (the 14B VAE and the tiny one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from model.config import VAEConfig

T = TypeVar("T")

# Wan's ResidualBlock is Sequential(RMS_norm, SiLU, Conv, RMS_norm, SiLU, Dropout, Conv) + optional 1x1 shortcut.
_RESNET_PARTS = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}


def vae_module_map(cfg: VAEConfig) -> dict[str, tuple[str, bool]]:
    """Wan module path → (diffusers module path, whether it is a residual block) for the architecture ``cfg``."""
    modules: dict[str, tuple[str, bool]] = {"conv1": ("quant_conv", False), "conv2": ("post_quant_conv", False)}
    for side in ("encoder", "decoder"):
        modules[f"{side}.conv1"] = (f"{side}.conv_in", False)
        modules[f"{side}.middle.0"] = (f"{side}.mid_block.resnets.0", True)
        modules[f"{side}.middle.1"] = (f"{side}.mid_block.attentions.0", False)
        modules[f"{side}.middle.2"] = (f"{side}.mid_block.resnets.1", True)
        modules[f"{side}.head.0"] = (f"{side}.norm_out", False)
        modules[f"{side}.head.2"] = (f"{side}.conv_out", False)
    stages = len(cfg.dim_mult)
    k = 0
    for stage in range(stages):
        for _ in range(cfg.num_res_blocks):
            modules[f"encoder.downsamples.{k}"] = (f"encoder.down_blocks.{k}", True)
            k += 1
        if stage != stages - 1:
            modules[f"encoder.downsamples.{k}"] = (f"encoder.down_blocks.{k}", False)
            k += 1
    k = 0
    for stage in range(stages):
        # Wan's decoder stages hold one residual block more than the encoder's.
        for j in range(cfg.num_res_blocks + 1):
            modules[f"decoder.upsamples.{k}"] = (f"decoder.up_blocks.{stage}.resnets.{j}", True)
            k += 1
        if stage != stages - 1:
            modules[f"decoder.upsamples.{k}"] = (f"decoder.up_blocks.{stage}.upsamplers.0", False)
            k += 1
    return modules


def _rename(key: str, modules: Mapping[str, tuple[str, bool]], parts: Mapping[str, str]) -> str | None:
    """Rename one parameter key by its longest matching module prefix; ``None`` when no module matches."""
    pieces = key.split(".")
    for n in range(len(pieces) - 1, 0, -1):
        prefix = ".".join(pieces[:n])
        if prefix not in modules:
            continue
        target, is_resnet = modules[prefix]
        suffix = pieces[n:]
        if is_resnet:
            for width in (2, 1):
                head = ".".join(suffix[:width])
                if head in parts:
                    return ".".join([target, parts[head], *suffix[width:]])
            return None
        return ".".join([target, *suffix])
    return None


def _convert(state: Mapping[str, T], modules: Mapping[str, tuple[str, bool]], parts: Mapping[str, str],
             source: str) -> dict[str, T]:
    out: dict[str, T] = {}
    unknown: list[str] = []
    for key, value in state.items():
        new = _rename(key, modules, parts)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not part of the {source} VAE layout, e.g. {unknown[:5]}")
    return out


def wan_vae_to_diffusers(state: Mapping[str, T], cfg: VAEConfig) -> dict[str, T]:
    """Rename a Wan-layout VAE state dict to ``AutoencoderKLWan`` keys; ``ValueError`` on keys Wan's VAE lacks."""
    return _convert(state, vae_module_map(cfg), _RESNET_PARTS, "Wan2.1")


def diffusers_vae_to_wan(state: Mapping[str, T], cfg: VAEConfig) -> dict[str, T]:
    """Inverse of :func:`wan_vae_to_diffusers`: ``AutoencoderKLWan`` keys → Wan's ``Wan2.1_VAE.pth`` keys."""
    inverse = {target: (wan, is_resnet) for wan, (target, is_resnet) in vae_module_map(cfg).items()}
    return _convert(state, inverse, {v: k for k, v in _RESNET_PARTS.items()}, "diffusers AutoencoderKLWan")
