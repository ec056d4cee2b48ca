"""The model stack of one profile on one device: DiT, VAE, wav2vec2, text encoder and the sampler schedule.

One place knows how a stack is built: official checkpoints when ``checkpoint_dir`` is set (see
:mod:`model.checkpoint`), else seeded random weights of the configured size, optionally overlaid with a project
checkpoint (one safetensors file, keys ``<module>.<parameter>``; the built-in tiny avatar ships one). The
runtime builds :class:`StackOptions` from its settings; nothing here knows about sessions or servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Wav2Vec2Model

from .attention import StreamAttention, resolve_attention
from .attention_fp8 import check_fp8_attention
from .audio_features import build_wav2vec2
from .config import ModelConfig
from .dit import CausalS2VDiT
from .init import build_random
from .kv_fp8 import kv_storage_dtype
from .sampler import FlowMatchSchedule
from .text import HashedTextEncoder
from .vae import build_vae


@dataclass(frozen=True)
class StackOptions:
    """How to build a stack: where it runs, its weights and the speed levers applied after loading.

    ``attention``: the DiT's self-attention — 'dtype' (the compute dtype's kernels), 'fp8' (e4m3 Q/K/V: cuDNN's
    FP8 flash attention on Hopper, the float32 reference on CPU; not text cross-attention or the audio injectors)
    or 'auto' ('dtype' for now). ``fp8_attention_skip_layers``: layers kept out of FP8 attention (negative
    indices count from the end). ``kv_cache_dtype``: storage of the KV rings and sink — 'auto' (e4m3 with FP8
    attention, else the compute dtype), 'bf16', or 'fp8' (e4m3 with per-(layer, head) scales: half of bf16's
    memory; :mod:`model.kv_fp8`).
    """

    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    threads: int = 0
    checkpoint_dir: Path | None = None
    lora: Path | None = None
    weights: Path | None = None
    text_device: str = "auto"
    fp8: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    attention: str = "auto"
    fp8_attention_skip_layers: tuple[int, ...] = (0, -1)
    kv_cache_dtype: str = "auto"
    steps: int = 4
    shift: float = 3.0


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' → torch dtype."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as exc:
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16") from exc


@dataclass(eq=False)
class ModelStack:
    """The models of one profile on one device (hashable by identity: runtime lanes are keyed by it)."""

    config: ModelConfig
    options: StackOptions
    device: torch.device
    dtype: torch.dtype
    dit: CausalS2VDiT
    vae: nn.Module
    wav2vec2: Wav2Vec2Model
    text_encoder: nn.Module
    schedule: FlowMatchSchedule

    @classmethod
    def load(cls, config: ModelConfig, options: StackOptions) -> "ModelStack":
        """Build the stack: official checkpoints if ``checkpoint_dir`` is set, else seeded random weights."""
        o = options
        if o.threads:
            torch.set_num_threads(o.threads)
        device, dtype = resolve_device(o.device), resolve_dtype(o.dtype)
        if o.checkpoint_dir is not None:
            from .checkpoint import load_official

            loaded = load_official(o.checkpoint_dir, o.lora, config, device, dtype)
            dit, vae, w2v, text = loaded.dit, loaded.vae, loaded.wav2vec2, loaded.text_encoder
            text = text.to(resolve_device(o.text_device))
        else:
            dit = build_random(lambda: CausalS2VDiT(config.dit), device, dtype, o.seed)
            torch.manual_seed(o.seed)
            vae = build_vae(config.vae)
            w2v = build_wav2vec2(config.wav2vec2)
            text = HashedTextEncoder(config.dit.text_dim, config.dit.text_len, seed=o.seed)
            w2v, text = (m.to(device=device, dtype=dtype) for m in (w2v, text))
            vae = vae.to(device=device) if dtype == torch.float32 else vae.to(device=device, dtype=dtype)
            if o.weights is not None:
                load_project_weights(o.weights, {"dit": dit, "vae": vae, "wav2vec2": w2v, "text": text})
        if device.type == "cpu":
            from .vae_cpu import speed_up_vae_

            speed_up_vae_(vae)
        elif device.type == "cuda":
            from .vae_layout import channels_last_vae_

            channels_last_vae_(vae)
        for m in (dit, vae, w2v, text):
            m.eval().requires_grad_(False)
        if o.fp8:
            from .fp8 import quantize_dit_

            quantize_dit_(dit)
        if o.compile:
            dit.compile_blocks()
        dit.cuda_graphs = o.cuda_graphs and device.type == "cuda"
        configure_attention(dit, o, device, dtype)
        return cls(config, o, device, dtype, dit, vae, w2v, text, FlowMatchSchedule(o.steps, o.shift))


def configure_attention(dit: CausalS2VDiT, options: StackOptions, device: torch.device, dtype: torch.dtype) -> None:
    """Set the DiT's self-attention kernels and KV storage dtype from ``options`` (raises, saying what to change,
    when FP8 attention cannot run on ``device``)."""
    mode = resolve_attention(options.attention)
    if mode == "fp8":
        check_fp8_attention(device)
    dit.attention = StreamAttention(mode, options.fp8_attention_skip_layers, dit.config.num_layers)
    dit.kv_cache_dtype = kv_storage_dtype(options.kv_cache_dtype, dtype, mode)


def load_project_weights(path: str | Path, modules: dict[str, nn.Module]) -> None:
    """Load a project checkpoint (one safetensors file, keys ``<module>.<parameter>``) strictly into ``modules``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(part, strict=True)
    unknown = [k for k in tensors if k.split(".", 1)[0] not in modules]
    if unknown:
        raise ValueError(f"{path}: unexpected keys {unknown[:5]}")
