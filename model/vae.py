"""Wan2.1 VAE wrapper: build, latent (de)normalisation, encode, and block-by-block streaming decode.

Latents handed to and from the DiT are *normalised* (``(mu - mean) / std`` per channel), as upstream; the VAE
itself only ever sees raw latents. Streaming decode drives ``AutoencoderKLWan.decoder`` a chunk of latent frames
at a time (a stream's first latent alone, as diffusers does) and keeps the causal-conv cache between calls, which
diffusers' own ``decode`` clears on every call.
The cache handling relies on the decoder's ``feat_cache`` / ``feat_idx`` arguments of diffusers 0.42.1.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from model.config import VAEConfig

TEMPORAL_STRIDE = 4


def build_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    """Build an ``AutoencoderKLWan`` (Wan2.1 layout) with the architecture in ``cfg`` and default latent stats."""
    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
    )


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` shaped ``[1, C, 1, 1, 1]`` on ``like``'s device and dtype."""
    channels = like.shape[1]
    if channels != len(vae.config.latents_mean):
        raise ValueError(
            f"latents have {channels} channels but the VAE's latents_mean has {len(vae.config.latents_mean)}; "
            "pass latents shaped [B, z_dim, t, h, w]"
        )
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents ``[B, C, t, h, w]`` → the normalised latents the DiT works in: ``(z - mean) / std``."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, C, t, h, w]`` → raw VAE latents: ``z * std + mean``."""
    mean, std = _latent_stats(vae, latents)
    return latents * std + mean


def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Encode ``video`` ``[B, 3, 1+4k, H, W]`` in [-1, 1] to normalised latents ``[B, z, 1+k, H/8, W/8]``.

    Uses the posterior mean (deterministic), not a sample.
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
    frames = video.shape[2]
    if (frames - 1) % TEMPORAL_STRIDE != 0:
        raise ValueError(f"video must have 1 + 4k frames, got {frames}; trim it to {frames - (frames - 1) % 4} frames")
    if vae.config.num_res_blocks < 1 and not vae.config.is_residual:
        raise ValueError(
            "AutoencoderKLWan's encoder changes width inside its residual blocks, so it cannot encode with "
            "num_res_blocks=0 (diffusers 0.42.1); use num_res_blocks >= 1 in the VAE config"
        )
    param = next(vae.parameters())
    with torch.no_grad():
        mu = vae.encode(video.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
        return normalize_latents(vae, mu)


class StreamingVAEDecoder:
    """Decodes one stream's normalised latents chunk by chunk, keeping the causal-conv cache between chunks.

    The cache belongs to this object, not to the VAE module, so several decoders (sessions) may share one VAE and
    interleave their calls. Decoding a stream in any split equals decoding it in one call. The first chunk after
    ``reset()`` yields ``1 + 4(t-1)`` frames, later chunks ``4t``. The cache list is passed to the VAE's decoder
    directly (never stored on the module), so different decoders may even run on different threads; one decoder
    must not be called from two threads at once.
    """

    def __init__(self, vae: AutoencoderKLWan, latents_per_call: int | None = None) -> None:
        """Wrap ``vae`` (Wan2.1 layout, ``patch_size=None``); the VAE's spatial-tiling setting is not applied.

        ``latents_per_call`` bounds how many latent frames go through the decoder at once (activation memory grows
        with it; fewer calls are faster). Default: the whole chunk on a CPU, one latent at a time on a GPU, where
        the 14B profile's decode activations must fit beside the DiT (bench/RESULTS.md measured it that way).
        """
        if vae.config.patch_size is not None:
            raise ValueError("StreamingVAEDecoder supports the Wan2.1 VAE layout only (patch_size=None)")
        if latents_per_call is not None and latents_per_call < 1:
            raise ValueError(f"latents_per_call must be >= 1, got {latents_per_call}")
        if latents_per_call is None and next(vae.parameters()).is_cuda:
            latents_per_call = 1
        self.vae = vae
        self.latents_per_call = latents_per_call
        self._num_convs: int = vae._cached_conv_counts["decoder"]
        self._cache: list[torch.Tensor | str | None] = []
        self._stream_shape: tuple[int, int, int] | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new stream: forget the causal cache so the next chunk is decoded as a stream's first."""
        self._cache = [None] * self._num_convs
        self._stream_shape = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents ``[B, z, t, h, w]`` into frames ``[B, 3, n, 8h, 8w]`` clamped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[2] == 0:
            raise ValueError(f"latents must be [B, z, t>=1, h, w], got shape {tuple(latents.shape)}")
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._stream_shape is not None and shape != self._stream_shape:
            raise ValueError(
                f"batch/spatial shape changed mid-stream from {self._stream_shape} to {shape}; call reset() first"
            )
        param = next(self.vae.parameters())
        with torch.no_grad():
            z = denormalize_latents(self.vae, latents.to(device=param.device, dtype=param.dtype))
            x = self.vae.post_quant_conv(z)
            outs = []
            if self._stream_shape is None:  # a stream's first latent alone: it primes the upsamplers' caches
                outs.append(self.vae.decoder(x[:, :, :1], feat_cache=self._cache, feat_idx=[0], first_chunk=True))
                self._stream_shape = shape
                x = x[:, :, 1:]
            step = self.latents_per_call or max(x.shape[2], 1)
            for i in range(0, x.shape[2], step):
                outs.append(self.vae.decoder(x[:, :, i:i + step], feat_cache=self._cache, feat_idx=[0]))
            return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).clamp_(-1.0, 1.0)


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[B, 3, n, H, W]`` in [-1, 1] → batch 0 as uint8 ``[n, H, W, 3]`` (same device)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [B, 3, n, H, W], got shape {tuple(frames.shape)}")
    pixels = ((frames[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()
