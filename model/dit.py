"""Causal S2V DiT: the Wan2.2-S2V trunk with Live Avatar's block-causal streaming inference.

Parameter names are the official checkpoint keys (``blocks.N.self_attn.q``, ``casual_audio_encoder.*``,
``audio_injector.injector.i.*``, ``frame_packer.*`` …), so an official state dict loads with strict checking.

Streaming, per session:
1. :meth:`CausalS2VDiT.prefill_sink` runs the reference latent and the FramePack-packed motion latents
   through every block once at timestep 0 and stores their per-layer K (un-roped) and V: the *sink*.
2. For each block of ``frames_per_block`` latent frames and each denoising step ``i``,
   :meth:`CausalS2VDiT.forward_block` attends the block's queries to [sink | rolling KV ring of step i],
   after writing the block's own roped K/V into that ring (so the ring holds history at noise level t_i,
   as upstream's "timestep forcing" does). The ring holds the last ``kv_cache_frames`` latent frames.
3. Audio tokens for the block come from :meth:`CausalS2VDiT.encode_audio`; text K/V are computed once per
   prompt by :meth:`CausalS2VDiT.text_kv`.

Training runs the same maths over whole clips, differentiably: :meth:`CausalS2VDiT.sink_kv` (the sink without
caches), :meth:`CausalS2VDiT.encode_audio_blocks` and :meth:`CausalS2VDiT.clip_velocity` (every block of a clip
against [sink | the ring it would see at inference]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNorm
from torch import nn

from .attention import StreamAttention, merge_attention, sdpa_backends
from .attention_fp8 import E4M3
from .audio_encoder import CausalAudioEncoder
from .config import DiTConfig
from .cuda_graphs import StepGraphs
from .kv_fp8 import StoredKV, kv_descale, quantize_fixed
from .rope import apply_rope, grid_positions, rope_cos_sin, spread_indices

REF_MASK_ID, MOTION_MASK_ID, NOISY_MASK_ID = 1, 2, 0


class WanRMSNorm(nn.Module):
    """RMSNorm over the full model width, computed in float32 (Wan's q/k norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters too, as under upstream's autocast) and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in (an FP8 layer reports its activation dtype, not float8)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a linear layer in its own compute dtype."""
    return layer(x.to(_dtype(layer)))


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: cos then sin, float64 maths, returned as float32 ``[B, dim]``."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    s = torch.outer(pos, freqs)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()


class WanAttention(nn.Module):
    """q/k/v/o projections with RMS q/k norm over the full width (Wan self/cross attention weights)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries ``[B, S, H, D]``."""
        return self.norm_q(_linear(self.q, x)).unflatten(-1, (self.num_heads, -1))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values ``[B, S, H, D]`` (un-roped)."""
        k = self.norm_k(_linear(self.k, x)).unflatten(-1, (self.num_heads, -1))
        v = _linear(self.v, x).unflatten(-1, (self.num_heads, -1))
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA over ``[B, S, H, D]`` inputs followed by the output projection."""
        dt = _dtype(self.o)
        out = F.scaled_dot_product_attention(q.transpose(1, 2).to(dt), k.transpose(1, 2).to(dt), v.transpose(1, 2).to(dt))
        return self.o(out.transpose(1, 2).flatten(2))

    def cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-attention of ``x`` to precomputed context K/V."""
        return self.attend(self.project_q(x), *kv)


class S2VBlock(nn.Module):
    """One Wan transformer block: modulated self-attention, text cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    # The block is split around self-attention so that the caller owns the KV memory and the attention
    # kernel, and the two halves can be compiled once and shared by all layers.
    def attn_input(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Modulated pre-norm of the self-attention: ``x [B, S, C]`` float32 residual stream, ``e [B, 6, C]``
        float32 time projection."""
        shift, scale = (self.modulation[:, :2].float() + e[:, :2]).unbind(1)
        return self.norm1(x) * (1 + scale[:, None]) + shift[:, None]

    def finish(self, x: torch.Tensor, attn: torch.Tensor, e: torch.Tensor,
               text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rest of the block after self-attention: ``attn [B, S, C]`` is the attention output before the
        output projection; adds it (gated), then text cross-attention and the modulated FFN."""
        gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation[:, 2:].float() + e[:, 2:]).unsqueeze(2).unbind(1)
        x = x + _linear(self.self_attn.o, attn).float() * gate_msa
        x = x + self.cross_attn.cross(self.norm3(x), text_kv).float()
        y = self.ffn((self.norm2(x) * (1 + scale_ffn) + shift_ffn).to(_dtype(self.ffn[0])))
        return x + y.float() * gate_ffn


class Head(nn.Module):
    """Output head: modulated LayerNorm + linear to patch pixels (``head.head``, ``head.modulation``)."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return _linear(self.head, self.norm(x) * (1 + scale) + shift)


class AudioInjector(nn.Module):
    """Per-frame audio cross-attention with AdaLN, applied after selected blocks (``audio_injector.*``)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(WanAttention(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(
            AdaLayerNorm(embedding_dim=cfg.dim, output_dim=2 * cfg.dim, chunk_dim=1) for _ in range(n))
        self.block_to_injector = {layer: i for i, layer in enumerate(cfg.audio_inject_layers)}

    def forward(self, index: int, x: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor) -> torch.Tensor:
        """Residual for noisy tokens ``x [B, F*T, C]`` given per-frame audio ``global [B,F,1,C]``,
        ``local [B,F,N,C]``."""
        return inject_audio(self.injector[index], self.injector_adain_layers[index], x, audio_global, audio_local)


def inject_audio(attn: WanAttention, ada: AdaLayerNorm, x: torch.Tensor, audio_global: torch.Tensor,
                 audio_local: torch.Tensor) -> torch.Tensor:
    """One audio injector (its attention and AdaLN passed in, so one compiled graph serves all of them)."""
    b, f = audio_local.shape[:2]
    frames = x.unflatten(1, (f, -1)).flatten(0, 1)
    dt = _dtype(ada.linear)
    normed = ada(frames.to(dt), temb=audio_global.flatten(0, 1)[:, 0].to(dt))
    out = attn.attend(attn.project_q(normed), *attn.project_kv(audio_local.flatten(0, 1)))
    return out.unflatten(0, (b, f)).flatten(1, 2)


def block_qkv(blk: S2VBlock, x: torch.Tensor, e: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roped queries, roped keys and values ``[B, S, H, D]`` of a block's self-attention."""
    h = blk.attn_input(x, e)
    q = apply_rope(blk.self_attn.project_q(h), cos, sin)
    k, v = blk.self_attn.project_kv(h)
    return q, apply_rope(k, cos, sin), v


def block_finish(blk: S2VBlock, x: torch.Tensor, parts: tuple[torch.Tensor, ...], e: torch.Tensor,
                 text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Merge the two partial self-attentions (sink, ring) and run the rest of the block."""
    out = merge_attention(*parts).transpose(1, 2).flatten(2)
    return blk.finish(x, out, e, text_kv)


class FramePackMotioner(nn.Module):
    """Packs 19 motion latents into 1× / 2× / 4× compressed token groups (``frame_packer.*``)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))
        self.buckets = tuple(cfg.zip_frame_buckets)

    def forward(self, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``motion [B, 16, M, h, w]`` (right-aligned into a zero buffer of sum(buckets) frames) →
        (tokens ``[B, S, C]``, positions ``[S, 3]``)."""
        b, c, m, h, w = motion.shape
        total = sum(self.buckets)
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, m)
        padded[:, :, total - keep:] = motion[:, :, m - keep:]
        n_post, n_2x, n_4x = self.buckets
        lat_4x, lat_2x, lat_post = padded.split([n_4x, n_2x, n_post], dim=2)
        dt = self.proj.weight.dtype
        tokens = [conv(lat.to(dt)).flatten(2).transpose(1, 2)
                  for conv, lat in ((self.proj, lat_post), (self.proj_2x, lat_2x), (self.proj_4x, lat_4x))]
        hp, wp = h // 2, w // 2
        pos = [
            grid_positions([-n_post], hp, wp),
            grid_positions([-(n_post + n_2x)], h // 4, w // 4, spread_indices(h // 4, hp), spread_indices(w // 4, wp)),
            grid_positions([-int(i) for i in _spread_down(total, total - n_4x + 1, n_4x // 4)],
                           h // 8, w // 8, spread_indices(h // 8, hp), spread_indices(w // 8, wp)),
        ]
        return torch.cat(tokens, dim=1), torch.cat(pos, dim=0)


def _spread_down(start: int, stop: int, count: int) -> list[int]:
    """``np.linspace(start, stop, count).astype(int)`` for the 4× group's temporal indices (19 → 4)."""
    import numpy as np

    return np.linspace(start, stop, count).astype(int).tolist()


@dataclass
class AudioTokens:
    """Audio conditioning for one block: per latent frame a global vector and local tokens."""

    global_: torch.Tensor
    local: torch.Tensor


class StepCaches:
    """KV memory of one stream: one sink shared by all denoising steps, and per step and layer a KV ring.

    The sink's motion keys are roped once at prefill (their positions never change); the reference keys are
    kept un-roped and re-roped for every block at the rolled position. Ring slots hold roped keys of the last
    ``kv_cache_frames`` latent frames; memory is fixed at allocation and never grows. The sink is identical for
    every step, so it is stored once (``sink_k``/``sink_v``) and attended separately from the ring, the two
    results merged by their log-sum-exp: at 704×384 this saves 3 × 2.2 GB against one [sink | ring] buffer
    per step.

    Ring and sink K/V are stored in ``kv_dtype`` (default: the compute ``dtype``). In e4m3 they carry one float32
    descale per (layer, head) for K and for V (``k_descale``/``v_descale`` ``[layers, heads]``), fixed at the
    stream's first sink prefill (:mod:`model.kv_fp8` says why): writes quantise once, saturating; reads hand the
    e4m3 tensors and descales to attention (:meth:`sink`, :meth:`ring`), which dequantises them or feeds them to
    an FP8 kernel as they are. The un-roped reference keys ``ref_k`` stay in ``dtype``.
    """

    def __init__(self, cfg: DiTConfig, steps: int, tokens_per_frame: int, sink_tokens: int,
                 batch: int, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
        self.tokens_per_frame = tokens_per_frame
        self.sink_tokens = sink_tokens
        self.ring_tokens = cfg.kv_cache_frames * tokens_per_frame
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        heads = (cfg.num_heads, cfg.head_dim)
        ring = (steps, cfg.num_layers, batch, self.ring_tokens) + heads
        sink = (cfg.num_layers, batch, sink_tokens) + heads
        self.k = torch.zeros(ring, device=device, dtype=self.kv_dtype)
        self.v = torch.zeros(ring, device=device, dtype=self.kv_dtype)
        self.sink_k = torch.zeros(sink, device=device, dtype=self.kv_dtype)
        self.sink_v = torch.zeros(sink, device=device, dtype=self.kv_dtype)
        self.ref_k = torch.zeros((cfg.num_layers, batch, tokens_per_frame) + heads, device=device, dtype=dtype)
        scales = (cfg.num_layers, cfg.num_heads)
        self.k_descale = torch.ones(scales, device=device) if self.fp8 else None
        self.v_descale = torch.ones(scales, device=device) if self.fp8 else None
        self.frames_written = [0] * steps
        self.ref_roped_for: int | None = None  # block start the sink's reference keys are currently roped for
        self.graphs: StepGraphs | None = None  # CUDA graphs of the full-ring steps (CausalS2VDiT.cuda_graphs)

    @property
    def fp8(self) -> bool:
        """Whether ring and sink K/V are stored in e4m3."""
        return self.kv_dtype == E4M3

    def nbytes(self) -> int:
        """Bytes of KV memory held (e4m3 K/V count one byte an element, plus their descales)."""
        tensors = (self.k, self.v, self.sink_k, self.sink_v, self.ref_k, self.k_descale, self.v_descale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def store_sink(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's sink: roped keys and values ``[B, sink_tokens, H, D]``. In e4m3, the first prefill of a
        stream (nothing in the rings yet) fixes the layer's descales from these K/V; a later one (the rolling-sink
        refresh) keeps them, so the rings stay valid."""
        if self.fp8 and not any(self.frames_written):
            self.k_descale[layer].copy_(kv_descale(k, rotary=True))
            self.v_descale[layer].copy_(kv_descale(v))
        self.sink_k[layer] = self._encode(k, self.k_descale, layer)
        self.sink_v[layer] = self._encode(v, self.v_descale, layer)

    def store_ref(self, layer: int, k: torch.Tensor) -> None:
        """Write the reference keys roped for the current block ``[B, tokens_per_frame, H, D]`` into the sink's
        first tokens."""
        self.sink_k[layer][:, :k.shape[1]] = self._encode(k, self.k_descale, layer)

    def store_block(self, step: int, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a block's roped keys and values ``[B, n, H, D]`` into ring ``step`` of ``layer`` at token ``slot``
        (device ops only: capturable in a CUDA graph)."""
        n = k.shape[1]
        self.k[step, layer][:, slot:slot + n] = self._encode(k, self.k_descale, layer)
        self.v[step, layer][:, slot:slot + n] = self._encode(v, self.v_descale, layer)

    def sink(self, layer: int) -> StoredKV:
        """The sink of ``layer`` as attention reads it."""
        return self._stored(self.sink_k[layer], self.sink_v[layer], layer)

    def ring(self, step: int, layer: int, written: int) -> StoredKV:
        """The first ``written`` tokens of ring ``step`` of ``layer`` as attention reads them."""
        return self._stored(self.k[step, layer][:, :written], self.v[step, layer][:, :written], layer)

    def dense_sink(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink K/V of ``layer`` in the compute dtype (dequantised when stored in e4m3)."""
        return self.sink(layer).dense(self.dtype)

    def dense_ring(self, step: int, layer: int, written: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring ``step`` of ``layer`` (its first ``written`` tokens, default all) in the compute dtype."""
        return self.ring(step, layer, self.ring_tokens if written is None else written).dense(self.dtype)

    def _encode(self, x: torch.Tensor, descale: torch.Tensor | None, layer: int) -> torch.Tensor:
        return quantize_fixed(x, descale[layer]) if self.fp8 else x

    def _stored(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> StoredKV:
        if self.fp8:
            return StoredKV(k, v, self.k_descale[layer], self.v_descale[layer])
        return StoredKV(k, v)

    def reset(self) -> None:
        """Make the memory ready for a new stream: nothing written yet (the next prefill refills the sink). The
        buffers and any CUDA graphs captured against them are kept."""
        self.frames_written = [0] * len(self.frames_written)
        self.ref_roped_for = None


class CausalS2VDiT(nn.Module):
    """Wan2.2-S2V DiT with official key names and block-causal streaming inference (constructor = config)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(S2VBlock(c) for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim, c.patch_size, c.eps)
        self.casual_audio_encoder = CausalAudioEncoder(c.audio_dim, c.num_audio_layers, c.dim, c.num_audio_token,
                                                       c.motion_frames, c.lat_motion_frames)
        self.audio_injector = AudioInjector(c)
        self.frame_packer = FramePackMotioner(c)
        self.cond_encoder = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self._qkv, self._finish, self._inject = block_qkv, block_finish, inject_audio
        self.compiled = False
        self.cuda_graphs = False  # replay full-ring steps on CUDA as graphs (model/cuda_graphs.py)
        self._rope: tuple[tuple, tuple[torch.Tensor, ...]] | None = None
        self.attention = StreamAttention()  # self-attention kernels (ModelStack sets FP8 attention here)
        self.kv_cache_dtype: torch.dtype | None = None  # storage of new KV caches; None = the compute dtype

    def compile_blocks(self, mode: str | None = None) -> None:
        """``torch.compile`` the per-layer pieces of :meth:`forward_block` (pre-attention, post-attention,
        audio injector) with static shapes. The pieces take the layer's module as an argument, so one graph
        serves all layers; KV writes and attention stay outside, where their slice bounds change per block."""
        kw = {"mode": mode, "dynamic": False}
        self._qkv, self._finish, self._inject = (torch.compile(fn, **kw) for fn in (block_qkv, block_finish, inject_audio))
        self.compiled = True

    # ----- conditioning -------------------------------------------------------------------------------
    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention K/V for a text context ``[B, text_len, text_dim]`` (once per prompt)."""
        emb = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [blk.cross_attn.project_kv(emb) for blk in self.blocks]

    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """wav2vec2 features of one block ``[B, L, C, frames]`` → audio tokens for its latent frames."""
        glob, local = self.casual_audio_encoder(features)
        return AudioTokens(glob, local)

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = sinusoidal_embedding(self.config.freq_dim, t)
        e = self.time_embedding(emb.to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(1, (6, self.config.dim))
        return e, e0

    def _patchify(self, conv: nn.Conv3d, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        out = conv(latents.to(conv.weight.dtype))
        return out.flatten(2).transpose(1, 2), tuple(out.shape[2:])

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens per latent frame for a latent of ``height × width``."""
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def sink_tokens(self, height: int, width: int) -> int:
        """Sink size in tokens: reference T + FramePack T + T/4 + T/4 (= 2.5·T)."""
        h2, w2 = height // 2, width // 2
        return 2 * h2 * w2 + (height // 4) * (width // 4) + 4 * (height // 8) * (width // 8)

    def new_caches(self, steps: int, height: int, width: int, batch: int = 1,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   kv_dtype: torch.dtype | None = None) -> StepCaches:
        """Allocate the fixed-size KV memory for one stream of latent size ``height × width``; K/V are stored in
        ``kv_dtype`` (default: :attr:`kv_cache_dtype`, else the compute dtype)."""
        p = next(self.parameters())
        return StepCaches(self.config, steps, self.tokens_per_frame(height, width), self.sink_tokens(height, width),
                          batch, device or p.device, dtype or p.dtype, kv_dtype or self.kv_cache_dtype)

    def ref_position(self, block_start: int) -> int:
        """Temporal RoPE index of the reference token when the current block starts at ``block_start``
        (Live Avatar's rolled sink: ``max(30, f + d)``)."""
        return max(self.config.ref_rope_index, block_start + self.config.sink_rope_distance)

    # ----- sink prefill -------------------------------------------------------------------------------
    def sink_inputs(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor
                    ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sink's tokens before the blocks: (reference + packed motion tokens with their condition masks
        ``[B, S, dim]`` float32, reference token count, RoPE cos/sin of their positions, t = 0 modulation)."""
        c = self.config
        ref_tokens, (_, hp, wp) = self._patchify(self.patch_embedding, ref_latent)
        mot_tokens, mot_pos = self.frame_packer(motion_latents)
        mask = self.trainable_cond_mask.weight
        x = torch.cat([ref_tokens + mask[REF_MASK_ID], mot_tokens + mask[MOTION_MASK_ID]], dim=1).float()
        positions = torch.cat([grid_positions([c.ref_rope_index], hp, wp), mot_pos], dim=0)
        cos, sin = (t.to(x.device) for t in rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_fp16_factors))
        _, e0 = self._time(torch.zeros(x.shape[0], device=x.device))
        return x, ref_tokens.shape[1], cos, sin, e0

    @torch.no_grad()
    def prefill_sink(self, caches: StepCaches, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                     text_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Run reference + packed motion tokens through all blocks at t = 0 and store their K/V in every
        step's buffer (reference keys un-roped, motion keys roped). Running it again mid-stream replaces the
        sink (Live Avatar's "rolling sink" refresh) and leaves the rings untouched."""
        x, n_ref, cos, sin, e0 = self.sink_inputs(ref_latent, motion_latents)
        sink = caches.sink_tokens
        assert x.shape[1] == sink, f"sink token count {x.shape[1]} != allocated {sink}"
        with sdpa_backends(x.device):
            for layer, blk in enumerate(self.blocks):
                h = blk.attn_input(x, e0)
                q = blk.self_attn.project_q(h)
                k, v = blk.self_attn.project_kv(h)
                caches.ref_k[layer] = k[:, :n_ref]
                k_roped = apply_rope(k, cos, sin)
                caches.store_sink(layer, k_roped, v)
                dt = _dtype(blk.self_attn.o)
                attn = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(dt) for t in (apply_rope(q, cos, sin), k_roped, v)))
                x = blk.finish(x, attn.transpose(1, 2).flatten(2), e0, text_kv[layer])
        caches.ref_roped_for = None

    # ----- one denoising step of one block ------------------------------------------------------------
    @torch.no_grad()
    def forward_block(self, latents: torch.Tensor, timestep: torch.Tensor, audio: AudioTokens,
                      text_kv: list[tuple[torch.Tensor, torch.Tensor]], caches: StepCaches, step: int,
                      block_start: int) -> torch.Tensor:
        """Flow prediction for a noisy block ``latents [B, 16, F, h, w]`` at ``timestep [B]``.

        Writes the block's roped K/V into ``caches`` for ``step`` at ring slot ``block_start mod ring`` and
        attends to [sink | ring]. ``block_start`` is the absolute latent frame index of the block's first
        frame; positions are exact integers, so streams never run out of RoPE positions.
        """
        c = self.config
        pt, ph, pw = c.patch_size
        f, hp, wp = latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw
        t_per_frame = hp * wp
        cos, sin, ref_cos, ref_sin = self._block_rope(block_start, f, hp, wp, latents.device)
        if caches.ref_roped_for != block_start:  # the rolled reference position changes once per block
            for layer in range(c.num_layers):
                caches.store_ref(layer, apply_rope(caches.ref_k[layer], ref_cos, ref_sin))
            caches.ref_roped_for = block_start
        ring = caches.ring_tokens
        slot = (block_start % c.kv_cache_frames) * t_per_frame
        assert slot + f * t_per_frame <= ring, "block must not straddle the ring end (kv_cache_frames % frames_per_block == 0)"
        written = min(max(caches.frames_written[step], block_start + f) * t_per_frame, ring)
        inputs = (latents, timestep.to(latents.device), audio.global_, audio.local, cos, sin)

        def run(x, t, audio_global, audio_local, cos, sin, text):
            return self._step(x, t, AudioTokens(audio_global, audio_local), cos, sin, text, caches, step, slot, written)

        if self.cuda_graphs and latents.is_cuda and written == ring:
            if caches.graphs is None:
                caches.graphs = StepGraphs()
                if self.attention.builds_plans:  # cuDNN builds the full-ring plans (which synchronise) eagerly;
                    run(*inputs, text_kv)        # the step is idempotent: it rewrites the same slot
            out = caches.graphs.run((step, slot), run, inputs, text_kv)
        else:
            out = run(*inputs, text_kv)
        caches.frames_written[step] = max(caches.frames_written[step], block_start + f)
        return out

    def _step(self, latents: torch.Tensor, timestep: torch.Tensor, audio: AudioTokens, cos: torch.Tensor,
              sin: torch.Tensor, text_kv: list[tuple[torch.Tensor, torch.Tensor]], caches: StepCaches, step: int,
              slot: int, written: int) -> torch.Tensor:
        """The kernels of one step (what a CUDA graph captures): write the block's K/V at ring token ``slot``,
        attend [sink | ring[:written]] in every layer, and predict the flow."""
        x, (f, hp, wp) = self._patchify(self.patch_embedding, latents)
        x = (x + self.cond_encoder.bias.to(x.dtype) + self.trainable_cond_mask.weight[NOISY_MASK_ID]).float()
        e, e0 = self._time(timestep)
        with sdpa_backends(x.device):
            for layer, blk in enumerate(self.blocks):
                q, k, v = self._qkv(blk, x, e0, cos, sin)
                caches.store_block(step, layer, slot, k, v)
                parts = (*self.attention(layer, q, caches.sink(layer)),
                         *self.attention(layer, q, caches.ring(step, layer, written)))
                x = self._finish(blk, x, parts, e0, text_kv[layer])
                if layer in self.audio_injector.block_to_injector:
                    idx = self.audio_injector.block_to_injector[layer]
                    x = x + self._inject(self.audio_injector.injector[idx], self.audio_injector.injector_adain_layers[idx],
                                         x, audio.global_, audio.local).float()
        out = self.head(x, e)
        return self._unpatchify(out, (f, hp, wp))

    def _block_rope(self, block_start: int, frames: int, hp: int, wp: int,
                    device: torch.device) -> tuple[torch.Tensor, ...]:
        """cos/sin of a block's tokens and of the rolled reference token, kept for the block's other steps
        (recomputing them means a host-to-device copy, which waits for the GPU, on every step)."""
        key = (block_start, frames, hp, wp, device)
        if self._rope is None or self._rope[0] != key:
            c = self.config
            positions = grid_positions(list(range(block_start, block_start + frames)), hp, wp)
            ref = grid_positions([self.ref_position(block_start)], hp, wp)
            tables = (*rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_fp16_factors),
                      *rope_cos_sin(ref, c.head_dim, c.rope_theta, c.rope_fp16_factors))
            self._rope = (key, tuple(t.to(device) for t in tables))
        return self._rope[1]

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        b = x.shape[0]
        x = x.float().view(b, f, h, w, pt, ph, pw, self.config.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(b, self.config.out_dim, f * pt, h * ph, w * pw)

    # ----- training forward: whole clips at once, differentiable --------------------------------------
    def sink_kv(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                text_kv: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (reference K un-roped, sink K roped, sink V): :meth:`prefill_sink` without the cache writes,
        differentiable. The result is the ``sink`` argument of :meth:`clip_velocity`."""
        x, n_ref, cos, sin, e0 = self.sink_inputs(ref_latent, motion_latents)
        out = []
        for layer, blk in enumerate(self.blocks):
            h = blk.attn_input(x, e0)
            q = blk.self_attn.project_q(h)
            k, v = blk.self_attn.project_kv(h)
            k_roped = apply_rope(k, cos, sin)
            out.append((k[:, :n_ref], k_roped, v))
            dt = _dtype(blk.self_attn.o)
            attn = F.scaled_dot_product_attention(
                *(t.transpose(1, 2).to(dt) for t in (apply_rope(q, cos, sin), k_roped, v)))
            x = blk.finish(x, attn.transpose(1, 2).flatten(2), e0, text_kv[layer])
        return out

    def encode_audio_blocks(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav2vec2 features of N blocks ``[B, N, L, C, frames]`` → the audio tokens of all their latent frames in
        order, (global ``[B, N·fpb, 1, D]``, local ``[B, N·fpb, T, D]``): :meth:`encode_audio` per block, batched."""
        b, nb = features.shape[:2]
        glob, local = self.casual_audio_encoder(features.flatten(0, 1))
        return glob.unflatten(0, (b, nb)).flatten(1, 2), local.unflatten(0, (b, nb)).flatten(1, 2)

    def clip_velocity(self, sink: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], noisy: torch.Tensor,
                      timestep: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor,
                      text_kv: list[tuple[torch.Tensor, torch.Tensor]], block0: int = 0) -> torch.Tensor:
        """Flow prediction for ``noisy [B, 16, N·fpb, h, w]`` (N consecutive blocks, the first at latent frame
        ``block0``, all at ``timestep [B]``), each block attending to [sink | ring] as :meth:`forward_block` does at
        one step: the ring holds the block itself and the previous ``kv_cache_frames - fpb`` latent frames.

        ``sink`` comes from :meth:`sink_kv`; ``audio_global`` / ``audio_local`` are the blocks' audio tokens in
        order (:meth:`encode_audio_blocks`). Concatenated [sink | ring] attention equals forward_block's
        log-sum-exp merge of the two, and is differentiable."""
        c = self.config
        fpb = c.frames_per_block
        x, (f, hp, wp) = self._patchify(self.patch_embedding, noisy)
        x = (x + self.cond_encoder.bias.to(x.dtype) + self.trainable_cond_mask.weight[NOISY_MASK_ID]).float()
        tpf = hp * wp
        n_blocks = f // fpb
        positions = grid_positions(list(range(block0, block0 + f)), hp, wp)
        cos, sin = (t.to(x.device) for t in rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_fp16_factors))
        ref_tabs = [tuple(t.to(x.device) for t in rope_cos_sin(
                        grid_positions([self.ref_position(block0 + j * fpb)], hp, wp),
                        c.head_dim, c.rope_theta, c.rope_fp16_factors))
                    for j in range(n_blocks)]
        e, e0 = self._time(timestep.to(x.device))
        n = fpb * tpf
        history = c.kv_cache_frames // fpb - 1
        for layer, blk in enumerate(self.blocks):
            q, k, v = block_qkv(blk, x, e0, cos, sin)
            ref_k, sink_k, sink_v = sink[layer]
            outs = []
            for j in range(n_blocks):
                roped_ref = apply_rope(ref_k, *ref_tabs[j])
                keys = torch.cat([roped_ref, sink_k[:, tpf:], k[:, max(0, j - history) * n:(j + 1) * n]], dim=1)
                vals = torch.cat([sink_v, v[:, max(0, j - history) * n:(j + 1) * n]], dim=1)
                dt = _dtype(blk.self_attn.o)
                o = F.scaled_dot_product_attention(
                    *(t.transpose(1, 2).to(dt) for t in (q[:, j * n:(j + 1) * n], keys, vals)))
                outs.append(o.transpose(1, 2).flatten(2))
            x = blk.finish(x, torch.cat(outs, dim=1), e0, text_kv[layer])
            if layer in self.audio_injector.block_to_injector:
                idx = self.audio_injector.block_to_injector[layer]
                x = x + self.audio_injector(idx, x, audio_global, audio_local).float()
        out = self.head(x, e)
        return self._unpatchify(out, (f, hp, wp))
