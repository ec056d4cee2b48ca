"""Key names of the umT5 encoder: Wan's ``T5Encoder`` (``models_t5_umt5-xxl-enc-bf16.pth``) ↔ transformers'
``UMT5EncoderModel``, and the ``UMT5Config`` implied by the checkpoint's tensor shapes.

Wan's encoder is ``token_embedding``, per block ``norm1 → attn(q,k,v,o) → norm2 → ffn(fc1 * gelu(gate.0)) → fc2``
with its own relative-position table (``pos_embedding.embedding``, umT5 has one per layer), then ``norm``.
The gated FFN's activated branch (``gate.0``) is transformers' ``wi_0``; the linear branch (``fc1``) is ``wi_1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from transformers import UMT5Config

T = TypeVar("T")

_BLOCK_PARTS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")

# Fixed by Wan's umT5 code (``T5RelativeEmbedding(max_dist=128)``, ``T5LayerNorm(eps=1e-6)``), not stored in the file.
REL_MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6


def wan_t5_to_hf(state: Mapping[str, T]) -> dict[str, T]:
    """Rename a Wan umT5 encoder state dict to ``UMT5EncoderModel`` keys (the tied ``encoder.embed_tokens`` is
    left out: it shares ``shared.weight``). ``ValueError`` on keys that Wan's encoder does not have."""
    out: dict[str, T] = {}
    unknown: list[str] = []
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif match and match.group(2) in _BLOCK_PARTS:
            out[f"encoder.block.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not part of Wan's umT5 encoder layout, e.g. {unknown[:5]}")
    return out


def hf_t5_to_wan(state: Mapping[str, T]) -> dict[str, T]:
    """Inverse of :func:`wan_t5_to_hf` (``encoder.embed_tokens.weight`` is dropped as the tie of ``shared``)."""
    top = {v: k for k, v in _TOP.items()}
    parts = {v: k for k, v in _BLOCK_PARTS.items()}
    out: dict[str, T] = {}
    for key, value in state.items():
        match = _HF_BLOCK_KEY.fullmatch(key)
        if key == "encoder.embed_tokens.weight":
            continue
        if key in top:
            out[top[key]] = value
        elif match and match.group(2) in parts:
            out[f"blocks.{match.group(1)}.{parts[match.group(2)]}"] = value
        else:
            raise ValueError(f"{key!r} is not a UMT5EncoderModel key")
    return out


def umt5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
    """The ``UMT5Config`` of a Wan-layout encoder, read from its tensor shapes (umT5-XXL: vocab 256384, d_model
    4096, 64 heads × 64, d_ff 10240, 24 layers, 32 buckets). ``ValueError`` if a shape needed is missing."""
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the umT5 architecture: missing {missing}")
    vocab, d_model = shapes["token_embedding.weight"]
    inner = shapes["blocks.0.attn.q.weight"][0]
    d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.fullmatch(k)))
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=REL_MAX_DISTANCE,
        layer_norm_epsilon=LAYER_NORM_EPS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
