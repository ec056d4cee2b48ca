"""One settings object for a run: a YAML profile from configs/, overridable by env (LIVE_AVATAR_*) and CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from model.config import ModelConfig
from model.stack import StackOptions

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def check_area(value: str) -> str:
    """An upstream area ``'W*H'`` (positive integers), or a ValueError saying what it should look like."""
    if not re.fullmatch(r"[1-9]\d*\*[1-9]\d*", value):
        raise ValueError(f"an area looks like '720*400', got {value!r}")
    return value


class VideoSettings(BaseModel):
    """Output video geometry and rate."""

    model_config = ConfigDict(extra="forbid")

    size_area: str = Field("704*384", description="Upstream area rule 'W*H': generation size keeps the image's "
                           "aspect ratio under this pixel area with both sides multiples of `size_multiple`.")
    size_multiple: int = 64
    fps: int = 25
    realtime: Literal["off", "auto"] = Field("off", description="'auto': at start-up each worker measures the block "
                                             "time at each of `realtime_sizes` (largest first) and generates at the "
                                             "largest that sustains fps × (1 + realtime_margin) for its share of "
                                             "max_sessions (size_area is then ignored); 'off': size_area, pinned.")
    realtime_sizes: list[str] = Field(["720*400", "688*368", "640*360", "384*256"], min_length=1,
                                      description="Candidate areas for realtime: auto, largest first.")
    realtime_margin: float = Field(0.10, ge=0, description="Head-room over fps that a size must sustain.")
    reference_photos: bool = Field(True, description="Whether the profile's model animates any photo. The built-in "
                                   "tiny model knows only its own characters: there a photo gets a warning (CLI, "
                                   "upload response, talk page) instead of a silent blob.")
    calibration_cache: Path | None = Field(None, description="JSON file of measured block times per device, torch "
                                           "version and settings; None = ~/.cache/live-avatar/calibration.json.")

    @field_validator("size_area")
    @classmethod
    def _area(cls, value: str) -> str:
        return check_area(value)

    @field_validator("realtime_sizes")
    @classmethod
    def _areas(cls, values: list[str]) -> list[str]:
        return [check_area(v) for v in values]


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
    overlap_decode: bool | Literal["auto"] = Field(True, description="Decode a block on a second thread (and CUDA "
                                                   "stream) while the next block is denoised, whenever the next "
                                                   "block's audio is already there. 'auto': on a CPU always; on a "
                                                   "GPU when a new stream starts with room for the decode's own "
                                                   "memory pool.")


ICE_URL = re.compile(r"(?P<scheme>stuns?|turns?):(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                     r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?")
ICE_URL_FORMS = "stun:HOST[:PORT], stuns:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"


def check_ice_url(url: str) -> str:
    """``url`` if it is a STUN/TURN URL (RFC 7064/7065) as browsers and aiortc take it; else a ``ValueError``."""
    match = ICE_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"{url!r} is not a STUN/TURN URL; use {ICE_URL_FORMS}")
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{url!r}: port {match['port']} is outside 1-65535")
    if match["transport"] is not None and not match["scheme"].startswith("turn"):
        raise ValueError(f"{url!r}: only turn: and turns: URLs take ?transport=")
    return url


class IceServer(BaseModel):
    """One STUN or TURN server, as a browser's ``RTCIceServer``: ``urls`` and, for TURN, username and credential —
    fixed, or minted per use from a ``secret`` shared with the TURN server (coturn ``use-auth-secret``: the TURN REST
    API's username ``<expiry>:live-avatar`` and credential base64(HMAC-SHA1(secret, username)), valid ``ttl_s``).

    A plain string stands for ``{"urls": [string]}``.
    """

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1, description="stun:/stuns:/turn:/turns: URLs of one server.")
    username: str | None = None
    credential: str | None = Field(None, repr=False)
    secret: str | None = Field(None, repr=False, description="coturn's static-auth-secret: credentials are minted "
                               "per page load / session instead of fixed ones.")
    ttl_s: float = Field(24 * 3600, gt=0, description="Lifetime of minted credentials.")

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        return {"urls": [data]} if isinstance(data, str) else data

    @field_validator("urls", mode="before")
    @classmethod
    def _one_url(cls, urls: Any) -> Any:
        return [urls] if isinstance(urls, str) else urls

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        return [check_ice_url(url) for url in urls]

    @model_validator(mode="after")
    def _turn_needs_credentials(self) -> IceServer:
        turn = [url for url in self.urls if url.startswith("turn")]
        if self.secret is not None:
            if not turn or self.credential is not None:
                raise ValueError("a secret mints TURN credentials: give it to turn:/turns: URLs, without a credential")
        elif turn and (self.username is None or self.credential is None):
            raise ValueError(f"TURN server {turn[0]!r} needs a username and a credential (or the secret its "
                             "use-auth-secret shares)")
        return self

    def with_credentials(self, now: float | None = None) -> IceServer:
        """This server with usable credentials: minted from ``secret`` to expire ``ttl_s`` after ``now`` (default:
        the current time), else as configured."""
        if self.secret is None:
            return self
        username = f"{int((time.time() if now is None else now) + self.ttl_s)}:{self.username or 'live-avatar'}"
        digest = hmac.new(self.secret.encode(), username.encode(), hashlib.sha1).digest()
        return IceServer(urls=self.urls, username=username, credential=base64.b64encode(digest).decode())

    def for_browser(self) -> dict[str, Any]:
        """The ``RTCIceServer`` dictionary a page passes to ``new RTCPeerConnection`` (fresh minted credentials)."""
        return self.with_credentials().model_dump(exclude_none=True, exclude={"ttl_s"})


KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


class AuthSettings(BaseModel):
    """Who may do what (docs/security.md): the operator's API key and the per-session tokens the talker shares."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(None, repr=False, description="Operator key, sent as `Authorization: Bearer KEY`: "
                                "lists sessions in /health, reads /metrics, controls any session, publishes over "
                                "WHIP. None: no key, allowed only on a loopback bind (or `serve --insecure`); then "
                                "/health and /metrics are open, and sessions still need their tokens.")
    token_secret: str | None = Field(None, repr=False, description="Secret that signs session tokens "
                                     "(HMAC-SHA256); None = random per process (tokens end with it, like sessions). "
                                     "Set the same one on front doors that must accept each other's tokens.")
    token_ttl_s: float = Field(6 * 3600, gt=0, description="Lifetime of a session's view and control tokens; a "
                               "connected viewer keeps watching past it, a new connection needs a fresh token.")
    publish: Literal["anyone", "key"] = Field("anyone", description="Who may start sessions (talk page, WHIP): "
                                              "'anyone' who reaches the server (bounded by max_sessions and the "
                                              "rate limits) or only holders of the API key.")
    public_metrics: bool = Field(False, description="Serve /metrics without the API key (its labels name the "
                                 "session ids).")

    @field_validator("api_key", "token_secret")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise ValueError(f"needs at least 16 characters; {KEY_HINT}")
        return value

    @model_validator(mode="after")
    def _publish_needs_key(self) -> AuthSettings:
        if self.publish == "key" and self.api_key is None:
            raise ValueError(f"publish: 'key' needs an api_key; {KEY_HINT}")
        return self


def check_origin(origin: str) -> str:
    """``origin`` lower-cased if it is a browser origin ``scheme://host[:port]`` (no path); else a ``ValueError``."""
    if not ORIGIN.fullmatch(origin):
        raise ValueError(f"{origin!r} is not an origin; write it as a browser sends it, e.g. https://app.example.org "
                         "or http://localhost:3000 (no path, no trailing slash)")
    return origin.lower()


class GuardSettings(BaseModel):
    """Browser safety and abuse limits in front of every endpoint (signaling/guard.py); limits count per client
    address."""

    model_config = ConfigDict(extra="forbid")

    allowed_hosts: list[str] = Field(default_factory=list, description="Host names served besides IP addresses, "
                                     "localhost and the bind host (DNS-rebinding defence); '*.example.org' also "
                                     "matches its subdomains, '*' matches any name (turns the defence off).")
    allowed_origins: list[str] = Field(default_factory=list, description="Origins of other sites' pages that may "
                                       "use /ws and POST here; the server's own pages always may.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins that get CORS headers (WHIP/WHEP "
                                    "players on other sites); they are allowed origins too.")
    trusted_proxies: list[str] = Field(default_factory=list, description="Addresses of reverse proxies whose "
                                       "X-Forwarded-For names the client (for the per-address limits).")
    http_rate: float = Field(20.0, gt=0, description="HTTP requests per second per address, sustained.")
    http_burst: int = Field(60, ge=1, description="HTTP requests per address allowed at once.")
    ws_rate: float = Field(10.0, gt=0, description="WebSocket messages per second per address, sustained.")
    ws_burst: int = Field(40, ge=1, description="WebSocket messages per address allowed at once; beyond the rate "
                          "the socket is closed (1008).")
    ws_per_address: int = Field(8, ge=1, description="Open signaling WebSockets per address.")
    ws_total: int = Field(256, ge=1, description="Open signaling WebSockets in all.")

    @field_validator("allowed_origins", "cors_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        return [check_origin(v) for v in values]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        return [v.lower().rstrip(".") for v in values]


class ServerSettings(BaseModel):
    """HTTP/WebRTC server options."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    reap_after_s: float = 8.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_side: int = 4096
    ice_servers: list[IceServer] = Field(default_factory=list, description="STUN/TURN servers for the server's "
                                         "peers, the pages and `live-avatar client` (e.g. [\"stun:stun.example.org\", "
                                         "{urls: [\"turn:turn.example.org\"], username: u, credential: p}]); empty = "
                                         "host candidates only (loopback/LAN), nothing is contacted.")
    auth: AuthSettings = AuthSettings()
    guard: GuardSettings = GuardSettings()


RTMP_HOST_PATTERN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.*]+\]|[A-Za-z0-9*_.-]+)(?::(?P<port>[0-9]{1,5}))?")


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
    rtmp_allowed_hosts: list[str] = Field(default_factory=list, description="Hosts an RTMP push may go to: "
                                          "'HOST' or 'HOST:PORT', '*' matching any characters (e.g. "
                                          "'*.contribute.live-video.net', 'a.rtmp.youtube.com', '127.0.0.1:1935'); "
                                          "empty = RTMP push refused. Matched against the URL's host as written, "
                                          "before any DNS lookup.")
    vcam_device: str | None = Field(None, description="v4l2loopback device (e.g. /dev/video10) that each new "
                                    "session shows its video on (pip extra [vcam]); None = no virtual camera.")

    @field_validator("rtmp_allowed_hosts")
    @classmethod
    def _host_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            match = RTMP_HOST_PATTERN.fullmatch(pattern)
            if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
                raise ValueError(f"{pattern!r} is not an RTMP host pattern; use HOST or HOST:PORT, where HOST may "
                                 "hold '*' (e.g. '*.example.com', '127.0.0.1:1935', '[::1]')")
        return [p.lower() for p in patterns]


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
    attention: Literal["auto", "dtype", "fp8"] = Field("auto", description="The DiT's self-attention: 'dtype' "
                                                       "(the compute dtype's kernels, bf16 cuDNN on GPUs), 'fp8' "
                                                       "(e4m3 Q/K/V through cuDNN's FP8 flash attention: Hopper GPU "
                                                       "and the nvidia-cudnn-frontend package; on CPU the float32 "
                                                       "reference of the same maths), or 'auto' (= 'dtype' until FP8 "
                                                       "is validated on real weights). Text cross-attention and the "
                                                       "audio injectors always stay in the compute dtype.")
    fp8_attention_skip_layers: list[int] = Field([0, -1], description="DiT layers kept out of FP8 attention "
                                                 "(negative indices count from the end; default the first and "
                                                 "last).")
    kv_cache_dtype: Literal["auto", "bf16", "fp8"] = Field("auto", description="Storage of the KV rings and sink: "
                                                           "'fp8' = e4m3 with one scale per layer and head, fixed at "
                                                           "the stream's first sink prefill (half of bf16's memory; "
                                                           "reads dequantise, or go straight to FP8 attention); "
                                                           "'bf16'; 'auto' = 'fp8' with attention: fp8, else the "
                                                           "compute dtype.")
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

    def stack_options(self) -> StackOptions:
        """What :meth:`model.stack.ModelStack.load` needs from this profile."""
        return StackOptions(device=self.device, dtype=self.dtype, seed=self.seed, threads=self.threads,
                            checkpoint_dir=self.checkpoint_dir, lora=self.lora, weights=self.weights,
                            text_device=self.text_device, fp8=self.fp8, compile=self.compile,
                            cuda_graphs=self.cuda_graphs, attention=self.attention,
                            fp8_attention_skip_layers=tuple(self.fp8_attention_skip_layers),
                            kv_cache_dtype=self.kv_cache_dtype, steps=self.stream.steps, shift=self.stream.shift)


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
        env = sorted(k for k in os.environ if k.upper().startswith("LIVE_AVATAR_"))
        hint = f" (environment overrides in effect: {', '.join(env)}; lists there are JSON)" if env else ""
        raise ConfigError(f"{cfg_path}: {exc}{hint}") from exc
