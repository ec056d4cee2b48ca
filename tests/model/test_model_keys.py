"""The DiT's parameter names and shapes are the official checkpoint's (model-facts §2), at any size."""

from __future__ import annotations

import torch

from model.config import DiTConfig
from model.dit import CausalS2VDiT


def expected_keys(c: DiTConfig) -> dict[str, tuple[int, ...]]:
    """The official key/shape tables (model-facts §2.2–2.6), written as functions of the config."""
    d, f, pt = c.dim, c.ffn_dim, c.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, c.in_dim, *pt), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, c.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, c.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (c.out_dim * 4, d), "head.head.bias": (c.out_dim * 4,),
        "casual_audio_encoder.weights": (1, c.num_audio_layers, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (d, c.audio_dim, 3),
        "casual_audio_encoder.encoder.conv1_local.conv.bias": (d,),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (d // 4, c.audio_dim, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.bias": (d // 4,),
        "casual_audio_encoder.encoder.conv2.conv.weight": (d // 2, d // 4, 3),
        "casual_audio_encoder.encoder.conv2.conv.bias": (d // 2,),
        "casual_audio_encoder.encoder.conv3.conv.weight": (d, d // 2, 3),
        "casual_audio_encoder.encoder.conv3.conv.bias": (d,),
        "casual_audio_encoder.encoder.final_linear.weight": (d, d),
        "casual_audio_encoder.encoder.final_linear.bias": (d,),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, d),
        "frame_packer.proj.weight": (d, 16, 1, 2, 2), "frame_packer.proj.bias": (d,),
        "frame_packer.proj_2x.weight": (d, 16, 2, 4, 4), "frame_packer.proj_2x.bias": (d,),
        "frame_packer.proj_4x.weight": (d, 16, 4, 8, 8), "frame_packer.proj_4x.bias": (d,),
        "cond_encoder.weight": (d, 16, *pt), "cond_encoder.bias": (d,),
        "trainable_cond_mask.weight": (3, d),
    }
    for n in range(c.num_layers):
        p = f"blocks.{n}."
        keys[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                keys[f"{p}{attn}.{proj}.weight"] = (d, d)
                keys[f"{p}{attn}.{proj}.bias"] = (d,)
            keys[f"{p}{attn}.norm_q.weight"] = (d,)
            keys[f"{p}{attn}.norm_k.weight"] = (d,)
        keys[p + "norm3.weight"] = (d,)
        keys[p + "norm3.bias"] = (d,)
        keys[p + "ffn.0.weight"], keys[p + "ffn.0.bias"] = (f, d), (f,)
        keys[p + "ffn.2.weight"], keys[p + "ffn.2.bias"] = (d, f), (d,)
    for i in range(len(c.audio_inject_layers)):
        p = f"audio_injector.injector.{i}."
        for proj in "qkvo":
            keys[f"{p}{proj}.weight"], keys[f"{p}{proj}.bias"] = (d, d), (d,)
        keys[p + "norm_q.weight"] = keys[p + "norm_k.weight"] = (d,)
        keys[f"audio_injector.injector_adain_layers.{i}.linear.weight"] = (2 * d, d)
        keys[f"audio_injector.injector_adain_layers.{i}.linear.bias"] = (2 * d,)
    return keys


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_tiny_config_has_exactly_the_official_keys_and_shapes(tiny_settings):
    cfg = tiny_settings.model.dit
    assert shapes_of(CausalS2VDiT(cfg)) == expected_keys(cfg)


def test_14b_config_matches_official_counts():
    with torch.device("meta"):
        model = CausalS2VDiT(DiTConfig())
    shapes = shapes_of(model)
    assert shapes == expected_keys(DiTConfig())
    assert len(shapes) == 1260
    assert sum(p.numel() for p in model.state_dict().values()) == 16_295_755_609
    per_block = [k for k in shapes if k.startswith("blocks.0.")]
    assert len(per_block) == 27
