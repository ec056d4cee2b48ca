"""CPU speed-up for the tiny Wan VAE: channels-last activations, oneDNN 3-D convolutions, fused streaming decode.

PyTorch sends a batch-1 ``conv3d`` whose ``N·C·T·H`` is at most 20480 to its naive ``slow_conv3d`` kernel rather
than oneDNN (a heuristic written for 2-D inputs), which makes the few-channel convs of a tiny VAE ~20× slower
than their arithmetic. Here every causal conv calls oneDNN directly on a channels-last (NDHWC) input — oneDNN's
fast layout for a few channels — with the spatial zero padding done inside the kernel. In a cached (streaming)
decode the activations stay channels-last from conv to conv:

- a residual block's ``RMS norm → SiLU`` writes straight into the next conv's input buffer behind the cached
  frames, so the causal time padding copies two frames, not the whole activation;
- the upsampling resamples (nearest ×2, then a 3×3 conv) are one 3×3 conv at the low resolution that writes
  the four sub-pixel phases, then a pixel shuffle: no ×4 upsampled copy, and 4× the output channels;
- oneDNN vectorises a conv over output channels, 8 at a time (AVX2), so a 3- or 4-channel conv wastes half the
  lanes. At such widths (the full-resolution level) frames are kept *paired*: memory ``[b, t/2, h, w, 2, c]``,
  i.e. ``t/2`` super-frames of ``2c`` channels, handed between modules as the 6-D view ``[b, c, t/2, 2, h, w]``.
  A causal 3-frame conv is then a 2-super-frame conv from ``2c`` to ``2·out`` channels (the taps that would
  reach outside a frame's 3-frame window are zero): 4/3 of the products, but full lanes, and the norm, SiLU and
  residual add work on the same memory order. Re-layouts move a pixel's 4 channels as one ``complex128``
  element, which PyTorch copies far faster than runs of 4 floats.

The modules stay diffusers modules with the same parameters (state dict unchanged); only their forwards change.
With autograd recording, or for tensors that are not float32 on the CPU, they fall back to diffusers' maths (the
causal convs keep oneDNN under autograd: it is differentiable); the encoder's downsampling is diffusers' own.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpBlock,
)
from torch import nn

_NDHWC = torch.channels_last_3d
_LANES = 8  # fp32 values per AVX2 vector: oneDNN's CPU convs vectorise output channels in groups of this many
# Which input rows (or columns) of a nearest ×2 upsample a 3×3 kernel tap reads, per output phase: for output row
# 2i + p, kernel row d reads low-resolution row i + r - 1 where _PHASE_TAPS[p, r, d] = 1.
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def _grad_mode(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on ``tensors`` (then the plain, differentiable maths is used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cpu_fp32(x: torch.Tensor) -> bool:
    """Whether ``x`` is a float32 CPU tensor, the only kind the oneDNN paths here take."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def _pairs(channels: int, frames: int) -> bool:
    """Whether activations of this width and length are kept as paired frames (see the module doc)."""
    return 2 * channels <= _LANES and frames % 2 == 0 and frames > 0


def _frames_shape(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(b, c, t, h, w)`` of frames ``[b, c, t, h, w]`` or of paired frames ``[b, c, t/2, 2, h, w]``."""
    if x.dim() == 6:
        b, c, pairs, two, h, w = x.shape
        return b, c, pairs * two, h, w
    b, c, t, h, w = x.shape
    return b, c, t, h, w


def _new_paired(like: torch.Tensor, b: int, c: int, pairs: int, h: int, w: int) -> torch.Tensor:
    """An uninitialised paired-frames tensor ``[b, c, pairs, 2, h, w]`` (memory ``[b, pairs, h, w, 2, c]``)."""
    return like.new_empty((b, pairs, h, w, 2, c)).permute(0, 5, 1, 4, 2, 3)


def _pixels(memory: torch.Tensor) -> torch.Tensor:
    """``memory`` ``[..., c]`` (contiguous) with each pixel's channels as one ``complex128`` element when ``c`` is
    a multiple of 4 (PyTorch copies 16-byte elements far faster than runs of 4 floats), else unchanged."""
    return memory.view(torch.complex128) if memory.shape[-1] % 4 == 0 else memory


def _unpair(x: torch.Tensor) -> torch.Tensor:
    """Frames ``[b, c, t, h, w]`` (NDHWC) from frames or paired frames ``x`` (copied only if paired)."""
    if x.dim() == 5:
        return x
    b, c, t, h, w = _frames_shape(x)
    memory = _pixels(x.permute(0, 2, 4, 5, 3, 1).contiguous())  # [b, t/2, h, w, 2, c]
    out = memory.permute(0, 1, 4, 2, 3, 5).contiguous().view(x.dtype).reshape(b, t, h, w, c)
    return out.permute(0, 4, 1, 2, 3)


def _channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x``'s memory as a ``[pixels, channels]`` matrix when its channels are innermost and it is dense."""
    channels = x.shape[1]
    if x.stride(1) != 1 and channels > 1:
        return None
    expected = channels
    for stride, size in sorted((st, sz) for i, (sz, st) in enumerate(zip(x.shape, x.stride())) if i != 1 and sz > 1):
        if stride != expected:
            return None
        expected *= size
    return x.as_strided((x.numel() // channels, channels), (channels, 1))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides along every dim longer than 1."""
    return a.shape == b.shape and all(s == 1 or x == y for s, x, y in zip(a.shape, a.stride(), b.stride()))


def _derived(module: nn.Module, name: str, build: Callable[[], Any]) -> Any:
    """``build()``, kept on ``module`` until one of its own parameters changes (in place or replaced)."""
    stamp = tuple((p.data_ptr(), p._version) for p in module.parameters(recurse=False))
    kept = module.__dict__.setdefault("_cpu_vae_derived", {})
    if name not in kept or kept[name][0] != stamp:
        kept[name] = (stamp, build())
    return kept[name][1]


class FastCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` run by oneDNN on channels-last input; returns channels-last output (same values)."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if self.groups != 1 or not _cpu_fp32(x) or not _cpu_fp32(self.weight):
            return super().forward(x, cache_x)
        time_pad = self._padding[4]
        x = x.contiguous(memory_format=_NDHWC)
        if cache_x is not None and time_pad > 0:
            x = torch.cat([cache_x.to(x.device).contiguous(memory_format=_NDHWC), x], dim=2)
            time_pad -= cache_x.shape[2]
        if time_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
        return self._onednn(x, self.weight, self.bias)

    def _onednn(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """oneDNN conv of ``x`` (time padding already in place; spatial padding done by the kernel)."""
        padding = (0, self._padding[2], self._padding[0])
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, self.stride, self.dilation, 1)

    def pairs_frames(self) -> bool:
        """Whether ``norm_act_forward`` takes paired frames: a causal 3-frame conv, stride and dilation 1."""
        return self.kernel_size[0] == 3 and self._padding[4] == 2 and self.stride[0] == 1 and self.dilation[0] == 1

    def norm_act_forward(self, norm: FastRMSNorm, x: torch.Tensor, feat_cache: list, idx: int) -> torch.Tensor:
        """``self(silu(norm(x)), feat_cache[idx])`` with diffusers' cache update; paired frames in (``x`` 6-D,
        if ``pairs_frames()``) give paired frames out.

        ``silu(norm(x))`` is written into the conv's input buffer behind the cached frames, so the time padding
        copies only those. The new cache is a copy of the buffer's last two frames.
        """
        b, c, t, h, w = _frames_shape(x)
        pad = self._padding[4]
        cached = feat_cache[idx]
        if x.dim() == 6:
            buf = _new_paired(x, b, c, 1 + t // 2, h, w)
            lead, act = buf[:, :, 0], buf[:, :, 1:]
        else:
            buf = x.new_empty((b, pad + t, h, w, c)).permute(0, 4, 1, 2, 3)
            lead, act = buf[:, :, :pad], buf[:, :, pad:]
        kept = 0 if cached is None or pad == 0 else min(cached.shape[2], pad)
        lead[:, :, : pad - kept].zero_()
        if kept:
            lead[:, :, pad - kept :].copy_(cached[:, :, -kept:])
        norm.normalize_into(x, act)
        F.silu(act, inplace=True)
        if x.dim() == 6:
            feat_cache[idx] = buf[:, :, -1].clone()
            return self._super_frame_conv(buf)
        # diffusers caches the last CACHE_T frames, led by the previous cache's last frame when x has only one
        feat_cache[idx] = buf[:, :, -CACHE_T:].clone() if t >= CACHE_T or cached is not None else act.clone()
        return self._onednn(buf, self.weight, self.bias)

    def _super_frame_conv(self, buf: torch.Tensor) -> torch.Tensor:
        """This conv over paired frames ``buf`` (one leading pair of padding frames) as a 2-super-frame conv."""
        b, c, _, _, h, w = buf.shape
        co = self.out_channels
        weight, bias = _derived(self, "super_frame", self._super_frame_weights)
        supers = buf.permute(0, 2, 4, 5, 3, 1).reshape(b, -1, h, w, 2 * c).permute(0, 4, 1, 2, 3)
        out = self._onednn(supers, weight, bias)  # [b, 2co, t/2, h, w] NDHWC
        return out.permute(0, 2, 3, 4, 1).unflatten(-1, (2, co)).permute(0, 5, 1, 4, 2, 3)

    def _super_frame_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights of the 2-super-frame conv: output frame ``2τ+po`` reads frame ``2(τ-1+s)+pi`` through the
        3-frame kernel's tap ``2s+pi-po`` (zero where that falls outside the kernel)."""
        co, ci = self.out_channels, self.in_channels
        weight = self.weight.new_zeros((2, co, 2, ci, 2, *self.kernel_size[1:]))
        for po in range(2):
            for pi in range(2):
                for s in range(2):
                    if 0 <= 2 * s + pi - po < 3:
                        weight[po, :, pi, :, s] = self.weight[:, :, 2 * s + pi - po]
        bias = None if self.bias is None else self.bias.repeat(2)
        return weight.reshape(2 * co, 2 * ci, 2, *self.kernel_size[1:]), bias


class FastRMSNorm(WanRMS_norm):
    """``WanRMS_norm`` that keeps a channels-last input channels-last and normalises in few passes.

    Same maths as ``F.normalize`` (the norm clamped at 1e-12), computed as ``x · rsqrt(max(Σx², 1e-24))``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_first or not _cpu_fp32(x):
            return super().forward(x)
        if _grad_mode(x, self.gamma):
            gain = self.scale * self.gamma
            return x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12) * gain + self.bias
        out = torch.empty_like(x)
        self.normalize_into(x, out)
        return out

    def normalize_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``self(x)`` into ``out`` (same shape, any strides; frames or paired frames); no autograd."""
        channels = x.shape[1]
        per_channel = (-1,) + (1,) * (x.dim() - 2)
        rows, out_rows = _channel_rows(x), _channel_rows(out)
        if rows is not None:  # channels innermost: Σx² as a [pixels, channels] × [channels, 1] matmul
            same = out_rows is not None and _same_layout(x, out)
            squares = torch.mul(rows, rows, out=out_rows) if same else rows.square()  # out: scratch until below
            inv = torch.mm(squares, x.new_ones(channels, 1)).clamp_min_(1e-24).rsqrt_()
            if same:
                torch.mul(rows, inv, out=out_rows)
            else:
                strides = [0 if i == 1 else st // channels for i, st in enumerate(x.stride())]
                torch.mul(x, inv.as_strided((x.shape[0], 1, *x.shape[2:]), strides, 0), out=out)
        else:
            inv = x.square().sum(dim=1, keepdim=True).clamp_min_(1e-24).rsqrt_()
            torch.mul(x, inv, out=out)
        if out_rows is not None:  # a per-channel vector broadcast along short rows is slow: tile it over k rows
            k = math.gcd(out_rows.shape[0], 16)
            gain, bias = _derived(self, f"tiled{k}", lambda: self._tiled_affine(k))
            out_rows.view(-1, k * channels).mul_(gain)
            if bias is not None:
                out_rows.view(-1, k * channels).add_(bias)
        else:
            out.mul_((self.scale * self.gamma).reshape(per_channel))
            if isinstance(self.bias, torch.Tensor):
                out.add_(self.bias.reshape(per_channel))

    def _tiled_affine(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale·gamma, bias)`` per channel, repeated ``k`` times (bias ``None`` when there is none)."""
        gain = (self.scale * self.gamma).reshape(-1).repeat(k)
        return gain, self.bias.reshape(-1).repeat(k) if isinstance(self.bias, torch.Tensor) else None


def _fast_norm_act_conv(norm: nn.Module, act: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(act(norm(x)))`` can take the fused path (patched modules, SiLU)."""
    return (
        type(norm) is FastRMSNorm
        and type(conv) is FastCausalConv3d
        and isinstance(act, nn.SiLU)
        and _cpu_fp32(conv.weight)
    )


class FastResidualBlock(WanResidualBlock):
    """``WanResidualBlock`` with each ``norm → SiLU → causal conv`` fused (see ``norm_act_forward``); paired
    frames in give paired frames out."""

    def fused(self) -> bool:
        """Whether the cached forward can take the fused path."""
        return (
            (not self.training or self.dropout.p == 0)
            and _fast_norm_act_conv(self.norm1, self.nonlinearity, self.conv1)
            and _fast_norm_act_conv(self.norm2, self.nonlinearity, self.conv2)
        )

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0]) -> torch.Tensor:
        if feat_cache is None or not _cpu_fp32(x) or _grad_mode(x, self.conv1.weight) or not self.fused():
            return super().forward(_unpair(x), feat_cache, feat_idx)
        if x.dim() == 6 and not (isinstance(self.conv_shortcut, nn.Identity) and self.conv1.pairs_frames()
                                 and self.conv2.pairs_frames()):
            x = _unpair(x)
        h = self.conv_shortcut(x)
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            idx = feat_idx[0]
            feat_idx[0] += 1
            x = conv.norm_act_forward(norm, x, feat_cache, idx)
        return x.add_(h)


class FastResample(WanResample):
    """``WanResample`` whose upsampling (nearest ×2 then 3×3 conv) is one low-resolution conv plus a pixel shuffle;
    channels-last in and out, paired frames out when ``paired_out`` and ``_pairs`` says so. Downsampling (the
    encoder's) is left to diffusers."""

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0],
                paired_out: bool = False) -> torch.Tensor:
        conv = self.resample[1] if self.mode in ("upsample2d", "upsample3d") else None
        x = _unpair(x)
        if conv is None or not _cpu_fp32(x) or not _cpu_fp32(conv.weight) or _grad_mode(x, conv.weight):
            return super().forward(x, feat_cache, feat_idx)
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            feat_idx[0] += 1
            if feat_cache[idx] is None:
                feat_cache[idx] = "Rep"
            else:
                x = self._upsample_time(x, feat_cache, idx)
                t *= 2
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)
        weight, bias = _derived(conv, "phases", lambda: self._phase_weights(conv))
        out = torch.ops.aten.mkldnn_convolution(frames, weight, bias, (1, 1), (1, 1), (1, 1), 1)
        co = conv.out_channels
        # [b·t, 4co, h, w] channels-last = [b, t, h, w, px, py, co] in memory → [b, t, h, py, w, px, co], moving
        # whole pixels; with px next to w, each (w, px) row is one long strided run
        src = _pixels(out.permute(0, 2, 3, 1).unflatten(-1, (4, co))).view(b, t, h, w, 2, 2, -1)
        if paired_out and _pairs(co, t):  # → [b, t/2, h, py, w, px, 2, co], one copy per frame of a pair
            src = src.unflatten(1, (t // 2, 2))
            out = src.new_empty((b, t // 2, h, 2, w, 2, 2, src.shape[-1]))
            for p in range(2):
                out[:, :, :, :, :, :, p].copy_(src[:, :, p].permute(0, 1, 2, 5, 3, 4, 6))
            return out.view(x.dtype).view(b, t // 2, 2 * h, 2 * w, 2, co).permute(0, 5, 1, 4, 2, 3)
        out = src.permute(0, 1, 2, 5, 3, 4, 6).contiguous().view(x.dtype)
        return out.view(b, t, 2 * h, 2 * w, co).permute(0, 4, 1, 2, 3)

    def _upsample_time(self, x: torch.Tensor, feat_cache: list, idx: int) -> torch.Tensor:
        """The causal time conv that doubles the frames (diffusers' cache rules), frames interleaved, NDHWC."""
        b, c, t, h, w = x.shape
        cached = feat_cache[idx]
        rep = isinstance(cached, str)
        cache_x = x[:, :, -CACHE_T:].clone(memory_format=_NDHWC)
        if cache_x.shape[2] < 2:
            first = torch.zeros_like(cache_x) if rep else cached[:, :, -1:].to(cache_x)
            cache_x = torch.cat([first, cache_x], dim=2)
        y = self.time_conv(x) if rep else self.time_conv(x, cached)
        feat_cache[idx] = cache_x
        # [b, 2c, t, h, w] NDHWC = [b, t, h, w, 2, c] in memory → frames 2τ + p: [b, t, 2, h, w, c]
        y = _pixels(y.permute(0, 2, 3, 4, 1).unflatten(-1, (2, c))).permute(0, 1, 4, 2, 3, 5)
        return y.contiguous().view(x.dtype).reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)

    @staticmethod
    def _phase_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3×3 conv over the low-resolution frame whose ``4·out`` channels are the sub-pixel phases (px, py)."""
        taps = _PHASE_TAPS.to(conv.weight)
        weight = torch.einsum("prd,qse,oide->qpoirs", taps, taps, conv.weight)
        weight = weight.reshape(4 * conv.out_channels, conv.in_channels, 3, 3)
        return weight.contiguous(memory_format=torch.channels_last), conv.bias.repeat(4)


class FastDecoder3d(WanDecoder3d):
    """``WanDecoder3d`` whose cached forward runs the fused blocks above — paired frames at the narrow levels —
    and fuses the head ``norm → SiLU → conv``; returns frames ``[b, 3, t, h, w]`` (NDHWC)."""

    def fused(self) -> bool:
        """Whether every block is one of the patched ones (else diffusers' forward runs)."""
        return (
            _fast_norm_act_conv(self.norm_out, self.nonlinearity, self.conv_out)
            and type(self.conv_in) is FastCausalConv3d
            and all(type(block) is WanUpBlock for block in self.up_blocks)
            and all(type(r) is FastResidualBlock and r.fused() for b in self.up_blocks for r in b.resnets)
            and all(type(u) is FastResample for b in self.up_blocks for u in (b.upsamplers or []))
        )

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0],
                first_chunk: bool = False) -> torch.Tensor:
        if feat_cache is None or not _cpu_fp32(x) or _grad_mode(x, self.conv_out.weight) or not self.fused():
            return super().forward(x, feat_cache, feat_idx, first_chunk)
        idx = feat_idx[0]
        feat_idx[0] += 1
        cache_x = x[:, :, -CACHE_T:].clone()
        if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
            cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x), cache_x], dim=2)
        x = self.conv_in(x, feat_cache[idx])
        feat_cache[idx] = cache_x
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        for block in self.up_blocks:  # WanUpBlock.forward, with paired frames out of the upsamplers
            for resnet in block.resnets:
                x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x, feat_cache=feat_cache, feat_idx=feat_idx, paired_out=True)
        if not self.conv_out.pairs_frames():
            x = _unpair(x)
        idx = feat_idx[0]
        feat_idx[0] += 1
        return _unpair(self.conv_out.norm_act_forward(self.norm_out, x, feat_cache, idx))


_SWAPS: dict[type, type] = {
    WanCausalConv3d: FastCausalConv3d,
    WanRMS_norm: FastRMSNorm,
    WanResample: FastResample,
    WanResidualBlock: FastResidualBlock,
    WanDecoder3d: FastDecoder3d,
}


def speed_up_vae_(vae: nn.Module) -> nn.Module:
    """Swap the forward of the VAE's convs, norms, resamples, residual blocks and decoder for the CPU-friendly
    ones, in place; returns ``vae``."""
    for module in vae.modules():
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
    return vae
