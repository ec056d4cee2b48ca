"""Write a tiny checkpoint folder in the exact official layout and key naming, for tests without real weights.

The DiT keys and shapes come from the official key tables (reference/model-facts.md §2, i.e. Wan2.2's
``WanModel_S2V``), written independently of ``model/dit.py`` so that loading the folder strictly proves the class
uses the official names. The VAE and umT5 files use Wan's own key names; wav2vec2 is a ``Wav2Vec2ForCTC`` folder;
the LoRA uses PEFT naming. Everything is seeded, so two calls write identical files.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from model.config import DiTConfig, ModelConfig, VAEConfig, Wav2Vec2Size
from model.vae import build_vae
from model.wan_t5_keys import hf_t5_to_wan
from model.wan_vae_keys import diffusers_vae_to_wan

CHECKPOINT_NAME = "Wan2.2-S2V-14B"
LORA_RELPATH = Path("LiveAvatar") / "liveavatar.safetensors"
TINY_LORA_RANK = 4
NUM_SHARDS = 2
T5_HEADS, T5_HEAD_DIM, T5_FFN, T5_LAYERS, T5_BUCKETS = 2, 8, 48, 2, 8
TOKENIZER_CORPUS = [
    "a person talks to the camera with a calm voice",
    "a woman is speaking and smiling in a bright room",
    "the man explains something, nodding his head",
    "close-up portrait, natural light, looking at the viewer",
]


def official_dit_shapes(c: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of Wan2.2-S2V's DiT (official names) with its shape for config ``c`` (1260 at 14B)."""
    d, p = c.dim, tuple(c.patch_size)
    s: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_dim: int, in_dim: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (out_dim, in_dim), (out_dim,)

    def conv(name: str, out_dim: int, in_dim: int, kernel: tuple[int, ...]) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (out_dim, in_dim, *kernel), (out_dim,)

    def attention(name: str) -> None:
        for proj in "qkvo":
            linear(f"{name}.{proj}", d, d)
        s[f"{name}.norm_q.weight"] = s[f"{name}.norm_k.weight"] = (d,)

    conv("patch_embedding", d, c.in_dim, p)
    linear("text_embedding.0", d, c.text_dim)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", d, c.freq_dim)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", 6 * d, d)
    for n in range(c.num_layers):
        s[f"blocks.{n}.modulation"] = (1, 6, d)
        attention(f"blocks.{n}.self_attn")
        s[f"blocks.{n}.norm3.weight"] = s[f"blocks.{n}.norm3.bias"] = (d,)
        attention(f"blocks.{n}.cross_attn")
        linear(f"blocks.{n}.ffn.0", c.ffn_dim, d)
        linear(f"blocks.{n}.ffn.2", d, c.ffn_dim)
    s["head.modulation"] = (1, 2, d)
    linear("head.head", c.out_dim * math.prod(p), d)
    enc = "casual_audio_encoder"
    s[f"{enc}.weights"] = (1, c.num_audio_layers, 1, 1)
    conv(f"{enc}.encoder.conv1_local.conv", d // 4 * c.num_audio_token, c.audio_dim, (3,))
    conv(f"{enc}.encoder.conv1_global.conv", d // 4, c.audio_dim, (3,))
    conv(f"{enc}.encoder.conv2.conv", d // 2, d // 4, (3,))
    conv(f"{enc}.encoder.conv3.conv", d, d // 2, (3,))
    linear(f"{enc}.encoder.final_linear", d, d)
    s[f"{enc}.encoder.padding_tokens"] = (1, 1, 1, d)
    for i in range(len(c.audio_inject_layers)):
        attention(f"audio_injector.injector.{i}")
        linear(f"audio_injector.injector_adain_layers.{i}.linear", 2 * d, d)
    # Wan hard-codes 16 input channels for the frame packer; the cond (pose) encoder uses cond_dim = 16.
    conv("frame_packer.proj", d, 16, (1, 2, 2))
    conv("frame_packer.proj_2x", d, 16, (2, 4, 4))
    conv("frame_packer.proj_4x", d, 16, (4, 8, 8))
    conv("cond_encoder", d, 16, p)
    s["trainable_cond_mask.weight"] = (3, d)
    return s


def lora_targets(c: DiTConfig) -> list[str]:
    """The modules Live Avatar's LoRA adapts (PEFT suffix match of q, k, v, o, ffn.0, ffn.2)."""
    names = [f"blocks.{n}.{attn}.{proj}" for n in range(c.num_layers) for attn in ("self_attn", "cross_attn")
             for proj in "qkvo"]
    names += [f"blocks.{n}.ffn.{i}" for n in range(c.num_layers) for i in (0, 2)]
    names += [f"audio_injector.injector.{i}.{proj}" for i in range(len(c.audio_inject_layers)) for proj in "qkvo"]
    return names


def wan_config_json(c: DiTConfig) -> dict:
    """``config.json`` as Wan's ``WanModel_S2V`` (a diffusers ConfigMixin) saves it: its constructor arguments,
    minus its ``ignore_for_config`` (patch_size, text_dim, window_size, qk_norm, cross_attn_norm). The key set is
    derived from the class; the released file itself was not available to compare (the version is a placeholder)."""
    return {
        "_class_name": "WanModel_S2V", "_diffusers_version": "0.33.1",
        "add_last_motion": True, "adain_mode": "attn_norm", "audio_dim": c.audio_dim,
        "audio_inject_layers": list(c.audio_inject_layers), "cond_dim": c.in_dim, "dim": c.dim,
        "enable_adain": True, "enable_framepack": True, "enable_motioner": False, "enable_tsm": False,
        "eps": c.eps, "ffn_dim": c.ffn_dim, "framepack_drop_mode": "padd", "freq_dim": c.freq_dim,
        "in_dim": c.in_dim, "model_type": "s2v", "motion_token_num": 1024, "num_audio_token": c.num_audio_token,
        "num_heads": c.num_heads, "num_layers": c.num_layers, "out_dim": c.out_dim, "text_len": c.text_len,
        "trainable_token_pos_emb": False, "zero_init": True, "zero_timestep": True,
    }


def _dit_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Plausible values: unit norm weights, SiLU-positive layer-mix weights, small biases, 1/sqrt(fan_in) else."""
    if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
        return torch.ones(shape)
    if name == "casual_audio_encoder.weights":
        return 0.5 + 0.1 * torch.rand(shape, generator=gen)
    if name.endswith("bias") or name.endswith("padding_tokens"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 and not name.endswith("modulation") else shape[-1]
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def _write_dit(ckpt: Path, c: DiTConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _dit_tensor(k, shape, gen) for k, shape in official_dit_shapes(c).items()}
    keys = list(tensors)
    per_shard = math.ceil(len(keys) / NUM_SHARDS)
    weight_map = {}
    for i in range(NUM_SHARDS):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        part = keys[i * per_shard:(i + 1) * per_shard]
        save_file({k: tensors[k] for k in part}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (ckpt / "config.json").write_text(json.dumps(wan_config_json(c), indent=2))


def tiny_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """The seeded diffusers VAE whose weights ``write_tiny_checkpoint`` stores in Wan's naming."""
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(cfg).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("gamma") else 0.05 * noise)
    return vae


def _write_tokenizer(folder: Path) -> int:
    """A Unigram tokenizer in umT5's conventions (<pad>=0, </s>=1, <unk>=2, "▁" word marks, EOS appended): the
    corpus words as whole pieces, anything else spelled letter by letter. Returns its vocabulary size."""
    words = sorted({w for line in TOKENIZER_CORPUS for w in line.replace(",", " ").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    vocab += [(ch, -10.0) for ch in string.ascii_lowercase + string.digits + ",.-'"]
    vocab += [("▁" + w, -5.0) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def _write_umt5(ckpt: Path, d_model: int, seed: int) -> None:
    vocab = _write_tokenizer(ckpt / "google" / "umt5-xxl")
    config = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=T5_HEAD_DIM, d_ff=T5_FFN, num_layers=T5_LAYERS,
                        num_heads=T5_HEADS, relative_attention_num_buckets=T5_BUCKETS,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        is_encoder_decoder=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    torch.save(hf_t5_to_wan(model.state_dict()), ckpt / "models_t5_umt5-xxl-enc-bf16.pth")


def _write_wav2vec2(folder: Path, size: Wav2Vec2Size, seed: int) -> None:
    config = Wav2Vec2Config(
        hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, intermediate_size=size.intermediate_size,
        conv_dim=tuple(size.conv_dim), num_conv_pos_embeddings=size.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=size.num_conv_pos_embedding_groups, feat_extract_norm="layer",
        do_stable_layer_norm=True, vocab_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(config)
    model.save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))


def write_lora(path: Path, c: DiTConfig, seed: int = 0, rank: int = TINY_LORA_RANK, prefix: str = "",
               adapter: str = "") -> None:
    """A PEFT-style LoRA over :func:`lora_targets`: ``{prefix}<module>.lora_A{adapter}.weight`` ``[rank, in]``
    and ``lora_B`` ``[out, rank]`` (``adapter`` is ``""`` or ``".default"``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = official_dit_shapes(c)
    tensors = {}
    for module in lora_targets(c):
        out_dim, in_dim = shapes[f"{module}.weight"]
        tensors[f"{prefix}{module}.lora_A{adapter}.weight"] = 0.1 * torch.randn(rank, in_dim, generator=gen)
        tensors[f"{prefix}{module}.lora_B{adapter}.weight"] = 0.1 * torch.randn(out_dim, rank, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def tiny_lora_path(root: Path) -> Path:
    """Where :func:`write_tiny_checkpoint` put the LoRA (``root/LiveAvatar/liveavatar.safetensors``)."""
    return root / LORA_RELPATH


def write_tiny_checkpoint(root: Path, model_cfg: ModelConfig, seed: int = 0) -> Path:
    """Write ``root/Wan2.2-S2V-14B/`` (official layout) and ``root/LiveAvatar/liveavatar.safetensors``
    for ``model_cfg``'s sizes. The LoRA has rank 4 and, like the official file, no alpha tensor: the loader's
    Live Avatar ratio alpha = rank / 2 (64 / 128) gives alpha 2, scale 0.5.

    Returns the checkpoint folder; the LoRA path is :func:`tiny_lora_path` ``(root)``.
    """
    ckpt = root / CHECKPOINT_NAME
    ckpt.mkdir(parents=True)
    _write_dit(ckpt, model_cfg.dit, seed)
    vae_state = {k: v.clone() for k, v in tiny_vae(model_cfg.vae, seed).state_dict().items()}
    torch.save(diffusers_vae_to_wan(vae_state, model_cfg.vae), ckpt / "Wan2.1_VAE.pth")
    _write_umt5(ckpt, model_cfg.dit.text_dim, seed)
    _write_wav2vec2(ckpt / "wav2vec2-large-xlsr-53-english", model_cfg.wav2vec2, seed)
    write_lora(tiny_lora_path(root), model_cfg.dit, seed)
    return ckpt
