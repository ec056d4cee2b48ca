"""One settings object for a run: a YAML profile from configs/, overridable by env (LIVE_AVATAR_*) and CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


class VideoSettings(BaseModel):
    """Output video geometry and rate."""

    model_config = ConfigDict(extra="forbid")

    size_area: str = Field("704*384", description="Upstream area rule 'W*H': generation size keeps the image's "
                           "aspect ratio under this pixel area with both sides multiples of `size_multiple`.")
    size_multiple: int = 64
    fps: int = 25


class StreamSettings(BaseModel):
    """Streaming generation: sampler, caches, audio window, ring."""

    model_config = ConfigDict(extra="forbid")

    steps: int = 4
    shift: float = 3.0
    drop_first_frames: int = Field(3, description="Frames dropped from the very first decoded block (upstream "
                                   "drops 3); the audio is offset by the same amount so A/V stays aligned.")
    audio_left_context_s: float = Field(1.0, description="Seconds of past audio wav2vec2 sees before a block.")
    audio_lookahead_s: float = Field(0.16, description="Seconds of future audio a block waits for; this is "
                                     "part of the generation latency.")
    ring_capacity_frames: int = 48
    vae_warmup_latents: int = Field(7, description="Motion latents decoded once to prime the VAE cache.")
    refresh_sink: bool = Field(True, description="Live Avatar's rolling sink: at the start of the second clip, "
                               "re-prefill the sink with the first generated latent frame as the reference.")
    overlap_decode: bool = Field(True, description="Decode a block on a second thread (and CUDA stream) while "
                                 "the next block is denoised, whenever the next block's audio is already there.")


class ServerSettings(BaseModel):
    """HTTP/WebRTC server options."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    reap_after_s: float = 8.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_side: int = 4096


class OutputSettings(BaseModel):
    """The session's shared encode (one per session, for every consumer), RTMP push and virtual camera."""

    model_config = ConfigDict(extra="forbid")

    encoder: Literal["auto", "libx264", "h264_nvenc"] = Field("auto", description="H.264 encoder: 'auto' tries "
                                                              "NVENC on CUDA sessions and falls back to libx264.")
    x264_preset: str = Field("veryfast", description="libx264 preset (aiortc's default would be 'medium').")
    video_kbps: int | None = Field(None, description="Video bitrate; None = 0.1 bit per pixel per frame.")
    keyframe_interval_s: float = Field(2.0, gt=0, description="Seconds between regular keyframes (RTMP services "
                                       "want 2 s); receivers may ask for more (PLI/FIR), rate-limited.")
    rtmp_audio_kbps: int = 128
    vcam_device: str | None = Field(None, description="v4l2loopback device (e.g. /dev/video10) that each new "
                                    "session shows its video on (pip extra [vcam]); None = no virtual camera.")


class PipelineSettings(BaseModel):
    """Step pipeline over several GPUs of one host (live/pipeline.py): rank i runs denoising steps i, i+N, ..."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(1, ge=1, description="Processes (one GPU each); 1 = the single-process engine.")
    backend: Literal["nccl", "gloo"] = Field("nccl", description="torch.distributed backend for latents and "
                                             "frames: nccl on GPUs, gloo on CPU.")
    decode_on: Literal["last", "own"] = Field("last", description="VAE decode on the last rank, which also runs "
                                              "DiT steps ('last'), or on a rank of its own ('own').")


class Settings(BaseSettings):
    """A complete run profile. Load with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="LIVE_AVATAR_", env_nested_delimiter="__", extra="forbid")

    name: str = "custom"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', or 'cuda:N'.")
    dtype: str = Field("float32", description="Compute dtype: float32 | bfloat16.")
    checkpoint_dir: Path | None = Field(None, description="Official checkpoint folder; None = random weights.")
    lora: Path | None = None
    weights: Path | None = Field(None, description="Project checkpoint (safetensors, keys prefixed dit./vae./"
                                 "wav2vec2./text.) loaded strictly over the seeded random stack; the tiny profile "
                                 "ships one.")
    text_device: str = Field("auto", description="Where the text encoder runs ('cpu' keeps umT5-XXL's ~11 GB "
                             "off the GPU; prompts are encoded once per change).")
    seed: int = 0
    threads: int = Field(0, description="torch CPU threads (0 = torch default).")
    fp8: bool = Field(False, description="FP8 (e4m3) weights and activations in the DiT's transformer blocks and "
                      "audio injectors (torch._scaled_mm on CUDA; emulated elsewhere).")
    compile: bool = Field(False, description="torch.compile the DiT's per-layer pieces (first blocks compile).")
    cuda_graphs: bool = Field(False, description="Replay each denoising step as a CUDA graph once a stream's KV "
                              "ring is full (captured during the first blocks after that; CUDA only).")
    model: ModelConfig = ModelConfig()
    video: VideoSettings = VideoSettings()
    stream: StreamSettings = StreamSettings()
    server: ServerSettings = ServerSettings()
    output: OutputSettings = OutputSettings()
    pipeline: PipelineSettings = PipelineSettings()
    source: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the YAML profile, which arrives as init kwargs.
        return env_settings, init_settings


class ConfigError(ValueError):
    """A profile file is missing or invalid."""


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read a YAML profile (default: the built-in tiny profile) and apply keyword overrides on top."""
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG
    if not cfg_path.exists() and not cfg_path.is_absolute() and (REPO_ROOT / cfg_path).exists():
        cfg_path = REPO_ROOT / cfg_path
    if not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    try:
        data = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path}: expected a mapping at the top level")
    base = cfg_path.parent
    for key in ("checkpoint_dir", "lora", "weights"):
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["source"] = str(cfg_path)
    try:
        return Settings(**data)
    except Exception as exc:  # pydantic.ValidationError carries the field paths
        raise ConfigError(f"{cfg_path}: {exc}") from exc
