"""Model configuration: one pydantic model per component, so a YAML profile fully describes a model size."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DiTConfig(BaseModel):
    """Architecture of the causal S2V DiT (Wan2.2-S2V trunk + Live Avatar streaming).

    Defaults are the official 14B values (``config.json`` of Wan2.2-S2V-14B); the tiny profile shrinks widths
    and depths but keeps every structural rule (RoPE split, injector layout, FramePack buckets).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    audio_dim: int = 1024
    num_audio_layers: int = 25
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    motion_frames: int = 73
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)
    frames_per_block: int = 3
    kv_cache_frames: int = 12
    ref_rope_index: int = 30
    sink_rope_distance: int = Field(
        17,
        description="Latent frames between the current block start and the rolled reference token. Upstream "
        "draws it from randint(4, 30) on every call; we fix it (the mean) so inference is deterministic.",
    )
    rope_theta: float = 10000.0
    rope_fp16_factors: bool = Field(
        True,
        description="Round RoPE cos/sin to float16 as Live Avatar's rope_precompute does (it writes the factors "
        "into a complex32 tensor); False uses exact float32 factors (differences ≤ 1e-4).",
    )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def lat_motion_frames(self) -> int:
        return (self.motion_frames + 3) // 4


class VAEConfig(BaseModel):
    """Constructor arguments of diffusers ``AutoencoderKLWan`` (Wan2.1 VAE layout)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)


class Wav2Vec2Size(BaseModel):
    """Size of the wav2vec2 feature extractor; the defaults are wav2vec2-large-xlsr-53."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16


class TextEncoderConfig(BaseModel):
    """Which text encoder turns prompts into ``[text_len, text_dim]`` embeddings.

    ``umt5`` loads the official umT5-XXL encoder from the checkpoint folder; ``hashed`` is a deterministic
    byte-embedding table for tiny models that have no language model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "umt5"
    max_tokens: int = 512


class ModelConfig(BaseModel):
    """Everything needed to build the model stack at one size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dit: DiTConfig = DiTConfig()
    vae: VAEConfig = VAEConfig()
    wav2vec2: Wav2Vec2Size = Wav2Vec2Size()
    text: TextEncoderConfig = TextEncoderConfig()
