"""``live-avatar train-tiny``: train the built-in avatar (tiny Wan VAE + tiny causal S2V DiT) on synthetic faces.

Stages, each resumable from ``--work`` (checkpoints every ``--save-every`` seconds):

1. ``vae``: the tiny ``AutoencoderKLWan`` as an autoencoder on short generated clips (1 + 4k frames), with the
   mouth box weighted up; then the latent statistics are folded into its ``quant_conv`` / ``post_quant_conv`` so
   the normalised latents the DiT sees (``(mu - mean) / std`` with the stock Wan mean/std) have zero mean and
   unit variance per channel.
2. ``audio``: the tiny wav2vec2 learns to hear the mouth (:mod:`train.audio`): with a linear probe head it
   predicts each frame's ground-truth mouth opening from the engine's own per-frame features.
3. ``data``: clips of ``blocks`` × 12 frames rendered from composed audio (speech / silence / tones), encoded as
   the engine decodes them (the reference frame first, so the decoder cache is primed by it), with the audio
   features of every block computed by the engine's own :func:`~model.audio_features.window_features` over the
   same windows :class:`~live.stream.audio_window.AudioWindow` hands out (a changed wav2vec2 needs a fresh ``data``).
4. ``dit``: flow matching, block-causally: per clip one denoising step ``i`` of the 4-step schedule; every block
   is noised to ``σ_i`` and attends to the sink and the previous ``kv_cache_frames`` latent frames at the same
   noise level — exactly what the step-``i`` KV ring holds at inference. :func:`clip_velocity` is that forward
   over all blocks at once, built from the DiT's own pieces (see its test for equality with ``forward_block``).
   Plus :func:`rollout_loss`: the mouth judged on the model's own sampling trajectory (:func:`sample_clips`).
5. ``decoder`` (after the others, encoder frozen): :func:`train_decoder` fine-tunes the VAE decoder on long
   streams decoded block by block as the engine does, the causal cache carried, backprop truncated every few
   blocks — the decoder must stay stable over a whole stream, not only over the first stage's short clips.
6. ``export``: only writes the weights file from ``--work`` / ``--init-from`` (scripts/device_train_tiny.sh runs
   ``decoder`` and ``dit`` side by side on one GPU, then this).

The result is one safetensors file with ``dit.`` / ``vae.`` / ``wav2vec2.`` / ``text.`` prefixes that
``ModelStack.load`` reads when the profile sets ``weights``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from live.settings import Settings, load_settings
from model.audio_features import window_features
from model.dit import NOISY_MASK_ID, CausalS2VDiT, _dtype, block_qkv
from model.rope import apply_rope, grid_positions, rope_cos_sin
from model.vae import denormalize_latents, encode_video
from train import synthetic as syn
from train.audio import (
    FRAMES_PER_BLOCK,
    AudioProbe,
    block_taps,
    block_windows,
    train_audio,
)
from train.loop import Budget, optimizer_step, resume, save_state, state_done


# ----- block-causal training forward ---------------------------------------------------------------------
def sink_kv(dit: CausalS2VDiT, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
            text_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (reference K un-roped, sink K roped, sink V) — :meth:`CausalS2VDiT.prefill_sink` without the
    cache writes, differentiable."""
    x, n_ref, cos, sin, e0 = dit.sink_inputs(ref_latent, motion_latents)
    out = []
    for layer, blk in enumerate(dit.blocks):
        h = blk.attn_input(x, e0)
        q = blk.self_attn.project_q(h)
        k, v = blk.self_attn.project_kv(h)
        k_roped = apply_rope(k, cos, sin)
        out.append((k[:, :n_ref], k_roped, v))
        dt = _dtype(blk.self_attn.o)
        attn = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(dt) for t in (apply_rope(q, cos, sin), k_roped, v)))
        x = blk.finish(x, attn.transpose(1, 2).flatten(2), e0, text_kv[layer])
    return out


def clip_velocity(dit: CausalS2VDiT, sink: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  noisy: torch.Tensor, timestep: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor,
                  text_kv: list[tuple[torch.Tensor, torch.Tensor]], block0: int = 0) -> torch.Tensor:
    """Flow prediction for ``noisy [B, 16, N·fpb, h, w]`` (N consecutive blocks, the first at latent frame
    ``block0``, all at ``timestep [B]``), each block attending to [sink | ring] as :meth:`forward_block` does at
    one step: the ring holds the block itself and the previous ``kv_cache_frames - fpb`` latent frames.

    ``audio_global [B, N·fpb, 1, C]`` and ``audio_local [B, N·fpb, T, C]`` are the blocks' audio tokens in order.
    Concatenated [sink | ring] attention equals forward_block's log-sum-exp merge of the two, and is differentiable.
    """
    c = dit.config
    fpb = c.frames_per_block
    x, (f, hp, wp) = dit._patchify(dit.patch_embedding, noisy)
    x = (x + dit.cond_encoder.bias.to(x.dtype) + dit.trainable_cond_mask.weight[NOISY_MASK_ID]).float()
    tpf = hp * wp
    n_blocks = f // fpb
    positions = grid_positions(list(range(block0, block0 + f)), hp, wp)
    cos, sin = (t.to(x.device) for t in rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_fp16_factors))
    ref_tabs = [tuple(t.to(x.device) for t in rope_cos_sin(grid_positions([dit.ref_position(block0 + j * fpb)], hp, wp),
                                                           c.head_dim, c.rope_theta, c.rope_fp16_factors))
                for j in range(n_blocks)]
    e, e0 = dit._time(timestep.to(x.device))
    n = fpb * tpf
    history = c.kv_cache_frames // fpb - 1
    for layer, blk in enumerate(dit.blocks):
        q, k, v = block_qkv(blk, x, e0, cos, sin)
        ref_k, sink_k, sink_v = sink[layer]
        outs = []
        for j in range(n_blocks):
            roped_ref = apply_rope(ref_k, *ref_tabs[j])
            keys = torch.cat([roped_ref, sink_k[:, tpf:], k[:, max(0, j - history) * n:(j + 1) * n]], dim=1)
            vals = torch.cat([sink_v, v[:, max(0, j - history) * n:(j + 1) * n]], dim=1)
            dt = _dtype(blk.self_attn.o)
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(dt) for t in (q[:, j * n:(j + 1) * n], keys, vals)))
            outs.append(o.transpose(1, 2).flatten(2))
        x = blk.finish(x, torch.cat(outs, dim=1), e0, text_kv[layer])
        if layer in dit.audio_injector.block_to_injector:
            idx = dit.audio_injector.block_to_injector[layer]
            x = x + dit.audio_injector(idx, x, audio_global, audio_local).float()
    out = dit.head(x, e)
    return dit._unpatchify(out, (f, hp, wp))


def encode_audio_blocks(dit: CausalS2VDiT, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``features [B, N, L, C, 12]`` (per block) → audio tokens of all blocks ``[B, N·fpb, ·, D]``."""
    b, nb = features.shape[:2]
    glob, local = dit.casual_audio_encoder(features.flatten(0, 1))
    return glob.unflatten(0, (b, nb)).flatten(1, 2), local.unflatten(0, (b, nb)).flatten(1, 2)


# ----- model stack for training ----------------------------------------------------------------------------
def build_stack(settings: Settings, device: torch.device):
    """The random stack exactly as ``ModelStack.load`` builds it (seeded), in float32 on ``device``."""
    from live.engine.stream import ProfileStack

    s = settings.model_copy(update={"weights": None, "device": "cpu", "dtype": "float32", "threads": 0})
    stack = ProfileStack.from_settings(s)
    stock_vae_(stack.vae, cpu=device.type == "cpu")
    for m in (stack.dit, stack.vae, stack.wav2vec2, stack.text_encoder):
        m.to(device)
    return stack


def stock_vae_(vae: torch.nn.Module, cpu: bool = False) -> torch.nn.Module:
    """Give every VAE module back its diffusers class: ``ModelStack.load`` on CPU swaps in inference-only fast paths
    (live/cpu_vae.py), while training needs differentiable maths on any device. With ``cpu`` the causal convs
    become :class:`_StackedConv3d` (differentiable, and ~20x faster than PyTorch's CPU conv3d for a few channels).
    Parameters are untouched (only classes change)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    stock = {v for v in vars(wan).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)}
    for module in vae.modules():
        if type(module) not in stock:
            base = next((c for c in type(module).__mro__ if c in stock), None)
            if base is not None:
                module.__class__ = base
        if cpu and type(module) is wan.WanCausalConv3d:
            module.__class__ = _stacked_conv_class()
    return vae


def _stacked_conv_class():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    class _StackedConv3d(WanCausalConv3d):
        """A causal conv (temporal stride 1) as one ``conv2d`` over its ``kt`` input frames stacked along channels:
        PyTorch's CPU ``conv3d`` takes a naive kernel for these few-channel shapes. Same values, differentiable."""

        def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
            if self.stride[0] != 1 or self.dilation != (1, 1, 1) or self.groups != 1:
                return super().forward(x, cache_x)
            padding = list(self._padding)
            if cache_x is not None and self._padding[4] > 0:
                x = torch.cat([cache_x.to(x.device), x], dim=2)
                padding[4] -= cache_x.shape[2]
            x = F.pad(x, padding)
            b, c, t, h, w = x.shape
            kt = self.kernel_size[0]
            frames = t - kt + 1
            stacked = x.unfold(2, kt, 1).permute(0, 2, 1, 5, 3, 4).reshape(b * frames, c * kt, h, w)
            weight = self.weight.reshape(self.out_channels, c * kt, *self.kernel_size[1:])
            out = F.conv2d(stacked, weight, self.bias, stride=self.stride[1:])
            return out.unflatten(0, (b, frames)).transpose(1, 2)

    global _STACKED
    if "_STACKED" not in globals():
        _STACKED = _StackedConv3d
    return _STACKED


def save_weights(path: Path, stack) -> None:
    """One safetensors file: ``dit.`` / ``vae.`` / ``wav2vec2.`` / ``text.`` prefixed float32 tensors."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("dit", stack.dit), ("vae", stack.vae), ("wav2vec2", stack.wav2vec2),
                           ("text", stack.text_encoder)):
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


# ----- stage 1: VAE ------------------------------------------------------------------------------------------
def _characters(seed: int, extra: int) -> list[syn.Character]:
    rng = np.random.default_rng(seed + 7)
    return list(syn.BUILTIN) + [syn.random_character(rng, f"rand{i}") for i in range(extra)]


def _random_face_clip(ch: syn.Character, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Frames with random mouth trajectories and idle motion (VAE training needs poses, not audio)."""
    idle = syn.idle_motion(frames, rng, start=int(rng.integers(0, 2000)))
    o = np.clip(np.cumsum(rng.normal(0, 0.35, frames)) * rng.uniform(0, 1) + rng.uniform(-0.3, 0.8), 0, 1)
    o = o * (rng.random(frames) > 0.15)
    r = np.clip(rng.uniform(0, 1) + np.cumsum(rng.normal(0, 0.2, frames)), 0, 1)
    return np.stack([syn.render_frame(ch, syn.FaceState(float(a), float(b), *m)) for a, b, m in zip(o, r, idle)]), 0


def _mouth_weight(chars: list[syn.Character], idx: list[int], device: torch.device, mouth: float = 8.0,
                  eyes: float = 3.0) -> torch.Tensor:
    w = torch.ones(len(idx), 1, 1, syn.SIZE, syn.SIZE, device=device)
    for b, i in enumerate(idx):
        x0, y0, x1, y1 = chars[i].mouth_box()
        w[b, :, :, y0:y1, x0:x1] = mouth
        cx, cy = chars[i].head_center
        w[b, :, :, int(cy - 25):int(cy + 5), int(cx - 35):int(cx + 35)] *= eyes
    return w


def _crop(video: torch.Tensor, w: torch.Tensor, chars, idx, size: int, rng: np.random.Generator):
    vs, ws = [], []
    for b, i in enumerate(idx):
        if rng.random() < 0.7:
            x0, y0, x1, y1 = chars[i].mouth_box()
            cx, cy = (x0 + x1) // 2 + int(rng.integers(-size // 3, size // 3 + 1)), (y0 + y1) // 2 + int(
                rng.integers(-size // 3, size // 3 + 1))
        else:
            cx, cy = (int(v) for v in rng.integers(size // 2, syn.SIZE - size // 2 + 1, 2))
        left = min(max(cx - size // 2, 0), syn.SIZE - size) // 8 * 8
        top = min(max(cy - size // 2, 0), syn.SIZE - size) // 8 * 8
        vs.append(video[b, :, :, top:top + size, left:left + size])
        ws.append(w[b, :, :, top:top + size, left:left + size])
    return torch.stack(vs), torch.stack(ws)


def _to_video(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → float [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def train_vae(stack, args, log) -> None:
    """Train the VAE as an autoencoder on short clips (``1 + 4·vae_latents`` frames decoded in one call). The
    decoder's long-stream behaviour is the ``decoder`` stage's job (:func:`train_decoder`)."""
    device = next(stack.vae.parameters()).device
    vae = stack.vae
    chars = _characters(args.seed, args.extra_characters)
    ckpt = Path(args.work) / "vae.pt"
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    step = resume(ckpt, "vae", vae, opt, device, log)
    if state_done(ckpt):
        return
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    pool = _worker_pool(args)
    last_save = time.time()
    frames = 1 + 4 * args.vae_latents
    budget = Budget(args.vae_minutes, args.vae_steps, step, args.deadline)
    while not budget.done(step):
        rng = np.random.default_rng([args.seed, 1, step])
        idx = [int(v) for v in rng.integers(0, len(chars), args.vae_batch)]
        seeds = [int(v) for v in rng.integers(0, 2**31, args.vae_batch)]
        clips = pool.starmap(_vae_clip_job, [(chars[i], frames, s) for i, s in zip(idx, seeds)])
        video = _to_video(np.stack(clips), device)
        w = _mouth_weight(chars, idx, device)
        if args.vae_crop < syn.SIZE:  # the VAE is convolutional: crops (mostly around the mouth) are cheaper
            video, w = _crop(video, w, chars, idx, args.vae_crop, rng)
        posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.mode()).sample
        err = (recon - video).abs() * w
        loss = err.mean() / w.mean() + 1e-4 * posterior.mode().pow(2).mean()
        optimizer_step(opt, params, loss, args.vae_lr, 200, 0.1, step, budget.progress(step))
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
        if time.time() - last_save > args.save_every:
            save_state({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last_save = time.time()
    vae.eval().requires_grad_(False)
    _fold_latent_stats(stack, chars, args, log)
    save_state({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "done": True}, ckpt)
    log(f"vae: done at step {step}")


def _vae_clip_job(ch: syn.Character, frames: int, seed: int) -> np.ndarray:
    return _random_face_clip(ch, frames, np.random.default_rng(seed))[0]


@torch.no_grad()
def _fold_latent_stats(stack, chars, args, log) -> None:
    """Make ``encode_video``'s normalised latents zero-mean unit-variance per channel by an exact affine change of
    the latent space folded into ``quant_conv`` (mu rows) and ``post_quant_conv`` (inputs)."""
    vae = stack.vae
    device = next(vae.parameters()).device
    rng = np.random.default_rng(args.seed + 3)
    clips = [_random_face_clip(chars[int(rng.integers(len(chars)))], 9, rng)[0] for _ in range(32)]
    z = encode_video(vae, _to_video(np.stack(clips), device))
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    # normalised z_n = (mu - m)/s; we want z_n' = (z_n - mean)/std, i.e. mu' = m + s*((mu - m)/s - mean)/std
    m = torch.tensor(vae.config.latents_mean, device=device)
    s = torch.tensor(vae.config.latents_std, device=device)
    a = 1.0 / std                       # mu' = a*mu + b
    b = m - a * m - s * mean / std
    zc = vae.config.z_dim
    qc = vae.quant_conv
    qc.weight[:zc] *= a.view(-1, 1, 1, 1, 1)
    qc.bias[:zc] = qc.bias[:zc] * a + b
    # decoder input: mu = (mu' - b)/a
    pq = vae.post_quant_conv
    w = pq.weight.clone()
    pq.bias += (w[..., 0, 0, 0] @ (-b / a))
    pq.weight.copy_(w / a.view(1, -1, 1, 1, 1))
    z2 = encode_video(vae, _to_video(np.stack(clips), device))
    log(f"vae: folded latent stats (before mean {mean.abs().mean():.3f} std {std.mean():.3f}; "
        f"after mean {z2.mean(dim=(0, 2, 3, 4)).abs().mean():.3f} std {z2.std(dim=(0, 2, 3, 4)).mean():.3f})")


# ----- stage 1b: the decoder, trained as it is used (streaming) -----------------------------------------------
def new_decoder_cache(vae) -> list:
    """An empty causal-conv cache for ``vae.decoder`` (what :meth:`StreamingVAEDecoder.reset` makes)."""
    return [None] * vae._cached_conv_counts["decoder"]


def decode_chunk(vae, cache: list, latents: torch.Tensor, first: bool) -> torch.Tensor:
    """:meth:`StreamingVAEDecoder.decode` with gradients and without the final clamp: normalised latents
    ``[B, z, t, h, w]`` → frames ``[B, 3, n, 8h, 8w]`` with ``cache`` (a list from :func:`new_decoder_cache`)
    carried across calls. ``first`` marks a stream's first chunk (after ``reset``): its first latent is decoded
    alone (it primes the temporal upsamplers), the rest of a chunk in one decoder call — the same values as one
    latent per call.

    The cache entries are slices of this chunk's activations, so gradients flow through them into earlier chunks
    (backprop through time) until :func:`detach_cache` cuts them."""
    x = vae.post_quant_conv(denormalize_latents(vae, latents))
    outs = []
    if first:
        outs.append(vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True))
        x = x[:, :, 1:]
    if x.shape[2]:
        outs.append(vae.decoder(x, feat_cache=cache, feat_idx=[0]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def detach_cache(cache: list) -> None:
    """Truncate backprop through time: keep the cache's values, drop their history (in place)."""
    for k, c in enumerate(cache):
        if isinstance(c, torch.Tensor):
            cache[k] = c.detach()


def _frame_loss(recon: torch.Tensor, target: torch.Tensor, w: torch.Tensor, prev: tuple | None,
                temporal: float, colour: float) -> torch.Tensor:
    """Weighted L1 on pixels + L1 on frame-to-frame changes (from ``prev``'s last frame on: block starts count,
    so seams and flicker cost) + L1 on 8×8 means (flat colours: shirt, background)."""
    wm = w.mean()
    loss = ((recon - target).abs() * w).mean() / wm
    if temporal:
        r, t = (recon, target) if prev is None else (torch.cat([prev[0], recon], 2), torch.cat([prev[1], target], 2))
        if r.shape[2] > 1:
            loss = loss + temporal * ((r.diff(dim=2) - t.diff(dim=2)).abs() * w).mean() / wm
    if colour:
        loss = loss + colour * (F.avg_pool3d(recon, (1, 8, 8)) - F.avg_pool3d(target, (1, 8, 8))).abs().mean()
    return loss


def _stream_job(ch: syn.Character, audio: np.ndarray, speech: np.ndarray, frames: int, seed: int) -> np.ndarray:
    return _data_clip_job(ch, audio, speech, frames, seed)[0]


@torch.no_grad()
def make_streams(stack, args, chars: list[syn.Character], count: int, latents: int, seed: int,
                 log=None) -> dict:
    """``count`` long talking streams (speech / silence / tones, as the DiT's data) of ``latents`` latent frames
    after the reference: uint8 frames ``[N, 1 + 4·latents, H, W, 3]`` (the reference image first, as the engine
    primes its decoder with it) and their normalised latents ``[N, z, 1 + latents, h, w]`` from the frozen encoder.
    Characters go round ``chars`` in order, so every one is covered."""
    device = next(stack.vae.parameters()).device
    bank = syn.load_speech_bank(args.speech)
    frames = 4 * latents
    rng = np.random.default_rng([seed, 21])
    jobs = []
    for k in range(count):
        audio, speech = syn.compose_audio(bank, frames / syn.FPS + 0.2, rng)
        jobs.append((chars[k % len(chars)], audio, speech, frames, int(rng.integers(2**31))))
    t0 = time.time()
    video = np.stack(_worker_pool(args).starmap(_stream_job, jobs))
    lat = []
    for start in range(0, count, 4):  # the encoder works through a stream 4 frames at a time: little memory
        lat.append(encode_video(stack.vae, _to_video(video[start:start + 4], device)).float().cpu())
    if log is not None:
        log(f"decoder: {count} streams of {video.shape[1]} frames rendered and encoded ({time.time() - t0:.0f} s)")
    return {"frames": video, "latents": torch.cat(lat), "char": np.arange(count) % len(chars)}


@torch.no_grad()
def decode_streams(vae, latents: torch.Tensor, chunk: int = 3) -> torch.Tensor:
    """Decode streams as the engine does: the reference latent alone (its frame dropped), then ``chunk`` latents
    at a time with the cache kept → uint8 ``[B, 4·(t-1), H, W, 3]``."""
    cache = new_decoder_cache(vae)
    decode_chunk(vae, cache, latents[:, :, :1], True)
    out = [decode_chunk(vae, cache, latents[:, :, a:a + chunk], False) for a in range(1, latents.shape[2], chunk)]
    return ((torch.cat(out, 2).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def eval_decoder(vae, val: dict, log, tag: str) -> dict:
    """Long-stream health of the decoder on held-out streams: PSNR per 48 frames (drift shows as a fall), mean
    frame difference at 12-frame block boundaries vs within blocks (seams), largest region colour error."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    got = decode_streams(vae, val["latents"].to(device)).numpy().astype(np.float32)
    vae.train(was_training)
    want = val["frames"][:, 1:].astype(np.float32)
    seg = 48
    psnr = [float(10 * np.log10(255 ** 2 / max(1e-6, ((got[:, a:a + seg] - want[:, a:a + seg]) ** 2).mean())))
            for a in range(0, got.shape[1], seg)]
    diffs = np.abs(np.diff(got, axis=1)).mean(axis=(0, 2, 3, 4))
    bi = np.arange(11, diffs.size, 12)
    boundary = float(diffs[bi].mean()) if bi.size else float("nan")
    within = float(np.delete(diffs, bi).mean())
    shirt = np.abs(got[:, :, 178:190, 80:112].mean(axis=(1, 2, 3)) - want[:, :, 178:190, 80:112].mean(axis=(1, 2, 3)))
    out = {"psnr": psnr, "boundary": boundary, "within": within, "shirt": float(shirt.max())}
    log(f"decoder eval {tag}: PSNR per {seg} frames " + " ".join(f"{v:.1f}" for v in psnr)
        + f"; frame diff at block starts {boundary:.2f} vs within {within:.2f}; worst shirt colour error "
        f"{out['shirt']:.1f}")
    return out


def train_decoder(stack, args, log) -> None:
    """Fine-tune the VAE decoder (and ``post_quant_conv``) the way the engine uses it: whole streams of
    ``decoder_latents`` latents, primed with the reference latent, decoded one block (3 latents) at a time with the
    causal cache carried across blocks. Truncated backprop through time: the graph spans ``decoder_tbptt`` blocks,
    then the optimizer steps and the cache is detached (its values carried on). The encoder — the DiT's latent
    space — stays frozen. Latents get Gaussian noise (σ up to ``decoder_noise``, half the streams) because at
    inference the decoder reads the DiT's latents, not the encoder's."""
    device = next(stack.vae.parameters()).device
    vae = stack.vae
    fpb = stack.dit.config.frames_per_block
    ckpt = Path(args.work) / "decoder.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        vae.load_state_dict(state["vae"])
        if state.get("done"):
            log("decoder: already done")
            return
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"decoder: resumed at step {step}")
    chars = _characters(args.seed, args.extra_characters)
    latents = -(-args.decoder_latents // fpb) * fpb
    pool = make_streams(stack, args, chars, args.decoder_streams, latents, args.data_seed, log)
    val = make_streams(stack, args, list(syn.BUILTIN), args.decoder_val_streams, args.decoder_val_latents, 12345)
    eval_decoder(vae, val, log, "before")
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    window = fpb * max(1, args.decoder_tbptt)
    windows = -(-latents // window)
    budget = Budget(args.decoder_minutes, args.decoder_steps, step, args.deadline)
    last_save, t0, ema = time.time(), time.time(), None
    n = len(pool["char"])
    batch = step // windows
    while not budget.done(step):
        rng = np.random.default_rng([args.data_seed, 2, batch])
        batch += 1
        idx = rng.integers(0, n, args.decoder_batch)
        lat = pool["latents"][idx].to(device)
        g = torch.Generator(device=device).manual_seed(int(rng.integers(2**31)))
        sigma = torch.from_numpy(rng.uniform(0, args.decoder_noise, len(idx)) * (rng.random(len(idx)) < 0.5))
        lat[:, :, 1:] += sigma.float().to(device).view(-1, 1, 1, 1, 1) * torch.randn(
            lat[:, :, 1:].shape, generator=g, device=device)
        w = _mouth_weight(chars, [int(pool["char"][i]) for i in idx], device, args.decoder_mouth_weight, 2.0)
        cache, prev = new_decoder_cache(vae), None
        for k in range(windows):
            a, b = k * window, min(latents, (k + 1) * window)
            parts = [decode_chunk(vae, cache, lat[:, :, :1], True)] if k == 0 else []  # the reference prime
            parts += [decode_chunk(vae, cache, lat[:, :, 1 + j:1 + min(b, j + fpb)], False) for j in range(a, b, fpb)]
            recon = torch.cat(parts, dim=2)
            f0 = 0 if k == 0 else 1 + 4 * a
            target = _to_video(np.ascontiguousarray(pool["frames"][idx, f0:1 + 4 * b]), device)
            loss = _frame_loss(recon, target, w, prev, args.decoder_temporal, args.decoder_colour)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for grp in opt.param_groups:
                grp["lr"] = args.decoder_lr * min(1.0, (step + 1) / 50) * (
                    0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * budget.progress(step))))
            opt.step()
            step += 1
            detach_cache(cache)
            prev = (recon[:, :, -1:].detach(), target[:, :, -1:])
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % 20 == 0:
                log(f"decoder step {step} loss {ema:.4f} ({time.time() - t0:.0f} s)")
            if budget.done(step):
                break
        if time.time() - last_save > args.save_every:
            save_state({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last_save = time.time()
    vae.eval().requires_grad_(False)
    save_state({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "done": True}, ckpt)
    eval_decoder(vae, val, log, "after")
    log(f"decoder: done at step {step}")


# ----- stage 2: data -----------------------------------------------------------------------------------------
def _worker_pool(args):
    import multiprocessing as mp

    global _POOL
    if "_POOL" not in globals():
        _POOL = mp.get_context("fork").Pool(max(1, args.workers))
    return _POOL


def _data_clip_job(ch: syn.Character, audio: np.ndarray, speech: np.ndarray, frames: int, seed: int):
    video, opening = syn.render_clip(ch, audio, speech, frames, np.random.default_rng(seed))
    ref = np.asarray(syn.reference_image(ch))
    return np.concatenate([ref[None], video]), opening


@torch.no_grad()
def make_data(stack, args, log) -> dict:
    path = Path(args.work) / "data.pt"
    if path.exists():
        return torch.load(path)
    device = next(stack.vae.parameters()).device
    chars = _characters(args.seed, args.extra_characters)
    bank = syn.load_speech_bank(args.speech)
    st = stack.settings.stream
    left = round(st.audio_left_context_s * syn.SAMPLE_RATE)
    ahead = round(st.audio_lookahead_s * syn.SAMPLE_RATE)
    frames = FRAMES_PER_BLOCK * args.blocks
    pool = _worker_pool(args)
    lat, feats, char_idx, opens = [], [], [], []
    rng = np.random.default_rng(args.data_seed + 11)
    t0 = time.time()
    chunk = 64
    for start in range(0, args.clips, chunk):
        jobs = []
        for _ in range(min(chunk, args.clips - start)):
            ci = int(rng.integers(len(chars)))
            audio, speech = syn.compose_audio(bank, frames / syn.FPS + 0.2, rng)
            jobs.append((ci, audio, speech, int(rng.integers(2**31))))
        outs = pool.starmap(_data_clip_job, [(chars[ci], a, s, frames, sd) for ci, a, s, sd in jobs])
        video = _to_video(np.stack([o[0] for o in outs]), device)
        lat.append(encode_video(stack.vae, video)[:, :, 1:].half().cpu())
        windows = np.stack([block_windows(audio, args.blocks, left, ahead) for _, audio, _, _ in jobs])
        if start == 0:
            taps = block_taps(stack.wav2vec2, args.blocks, left, windows.shape[-1], device)
        w = torch.from_numpy(windows).to(device).flatten(0, 1)
        f = window_features(stack.wav2vec2, w, tuple(t.repeat(len(jobs), 1) for t in taps))
        feats.extend(f.unflatten(0, (len(jobs), args.blocks)).half().cpu())
        char_idx.extend(ci for ci, _, _, _ in jobs)
        opens.extend(torch.from_numpy(opening) for _, opening in outs)
        log(f"data: {start + len(jobs)}/{args.clips} clips ({time.time() - t0:.0f} s)")
    refs, motions = [], []
    dit_cfg = stack.dit.config
    for ch in chars:
        pixels = _to_video(np.array(syn.reference_image(ch))[None, None], device)
        refs.append(encode_video(stack.vae, pixels)[0].cpu())
        motions.append(encode_video(stack.vae, pixels.expand(-1, -1, dit_cfg.motion_frames, -1, -1))[0].cpu())
    data = {"latents": torch.cat(lat), "features": torch.stack(feats), "char": torch.tensor(char_idx),
            "openness": torch.stack(opens), "ref": torch.stack(refs), "motion": torch.stack(motions)}
    save_state(data, path)
    return data


# ----- stage 3: DiT -------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_clips(dit: CausalS2VDiT, sched, sink, glob: torch.Tensor, local: torch.Tensor, text_kv,
                 noise: torch.Tensor, block0: int = 0, steps: int | None = None) -> list[torch.Tensor]:
    """The engine's sampler over whole clips: every block runs step ``i`` attending to the step-``i`` states of
    the blocks before it — what the step-``i`` KV ring holds at inference — so all blocks advance together.
    Returns the states before each step and the result: ``[x_0 = noise, x_1, …, x_steps]``."""
    b = noise.shape[0]
    x, states = noise, [noise]
    for i in range(sched.steps if steps is None else steps):
        t = sched.timesteps[i].to(noise.device).expand(b)
        x = sched.euler_step(x, clip_velocity(dit, sink, x, t, glob, local, text_kv, block0), i)
        states.append(x)
    return states


def _slice_kv(kv: list[tuple], n: int, detach: bool = False) -> list[tuple]:
    return [tuple((t[:n].detach() if detach else t[:n]) for t in layer) for layer in kv]


def rollout_loss(dit: CausalS2VDiT, sched, x0: torch.Tensor, sink, glob, local, text_kv, mouth: torch.Tensor,
                 block0: int, generator: torch.Generator) -> torch.Tensor:
    """The mouth on the model's own sampling trajectory. From fresh noise, run the first ``i ∈ {1, 2}`` steps of
    the sampler (no grad, as inference does), then ask step ``i`` for a prediction ``x̂0 = x_i − σ_i·v`` whose mouth
    cells (``mouth`` = 1) match the data's. Flow matching alone only ever sees ``x0·(1−σ) + σ·noise``; at inference
    step ``i`` starts where the model's own earlier steps left it (exposure bias), which is where the tiny model
    lost the mouth (closed for the first second of a stream, openings too small). Only the mouth is judged:
    it follows the audio, while blinks and sway (free in the data) would be averaged away by this regression."""
    b = x0.shape[0]
    sink_d, text_d = _slice_kv(sink, b, True), _slice_kv(text_kv, b, True)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    i = torch.randint(1, min(3, sched.steps), (b,), device=x0.device, generator=generator)
    states = sample_clips(dit, sched, sink_d, glob.detach(), local.detach(), text_d, noise, block0, int(i.max()))
    xt = torch.stack(states)[i, torch.arange(b, device=x0.device)]
    v = clip_velocity(dit, _slice_kv(sink, b), xt, sched.timesteps.to(x0.device)[i], glob, local,
                      _slice_kv(text_kv, b), block0)
    x0_hat = xt - sched.sigmas.to(x0.device)[i].view(-1, 1, 1, 1, 1) * v
    m = mouth.expand_as(x0)
    return ((x0_hat - x0).pow(2) * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def eval_dit(dit, sched, data: dict, val_idx: torch.Tensor, text, mouth_map, log, tag: str) -> dict:
    """Sample the held-out clips (block 0 at stream start, fixed noise) and compare with the data: mouth-cell MSE,
    the spread of the mouth cells (generated / data: under 1 means timid openings) and, per latent frame, the
    correlation of the mouth's distance from the closed-mouth reference latent (a proxy for openness)."""
    device = next(dit.parameters()).device
    x0 = data["latents"][val_idx].to(device).float()
    ci = data["char"][val_idx].to(device)
    feats = data["features"][val_idx].to(device).float()
    text_kv = dit.text_kv(text.expand(len(val_idx), -1, -1))
    sink = sink_kv(dit, data["ref"].to(device)[ci], data["motion"].to(device)[ci], text_kv)
    glob, local = encode_audio_blocks(dit, feats)
    g = torch.Generator(device=device).manual_seed(1234)
    out = sample_clips(dit, sched, sink, glob, local, text_kv, torch.randn(x0.shape, device=device, generator=g))[-1]
    m = mouth_map[ci].expand_as(x0)
    mse = float(((out - x0).pow(2) * m).sum() / m.sum())
    spread = float((out * m).std() / (x0 * m).std())
    ref = data["ref"].to(device)[ci].float()
    dist = lambda x: ((x - ref).abs() * m).sum(dim=(1, 3, 4)).flatten()  # noqa: E731
    r = float(torch.corrcoef(torch.stack([dist(out), dist(x0)]))[0, 1])
    log(f"dit eval {tag}: mouth mse {mse:.3f}, mouth spread {spread:.2f} (data 1), mouth-motion r {r:.3f}")
    return {"mse": mse, "spread": spread, "r": r}


def train_dit(stack, data: dict, args, log) -> None:
    device = next(stack.dit.parameters()).device
    dit, sched = stack.dit, stack.schedule
    ckpt = Path(args.work) / "dit.pt"
    params = [p for p in dit.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    step = resume(ckpt, "dit", dit, opt, device, log)
    latents = data["latents"].to(device)
    feats = data["features"].to(device)
    chars = data["char"].to(device)
    refs, motions = data["ref"].to(device), data["motion"].to(device)
    sigmas = sched.sigmas.to(device)
    timesteps = sched.timesteps.to(device)
    text = stack.text_encoder.encode("").to(device)
    fpb = dit.config.frames_per_block
    # the mouth is a few percent of the frame but all of the audio's effect: weight its latent cells up
    chars_all = _characters(args.seed, args.extra_characters)
    lh, lw = latents.shape[-2:]
    mouth_map = torch.zeros(len(chars_all), 1, 1, lh, lw, device=device)
    for n, ch in enumerate(chars_all):
        x0, y0, x1, y1 = ch.mouth_box()
        mouth_map[n, :, :, y0 // 8: -(-y1 // 8), x0 // 8: -(-x1 // 8)] = 1.0
    weight_map = 1.0 + (args.mouth_weight - 1.0) * mouth_map
    # the last clips are held out for eval_dit (all clips when there are too few to spare)
    n_val = min(args.val_clips, latents.shape[0] // 4)
    n_train = latents.shape[0] - n_val
    val_idx = torch.arange(n_train, latents.shape[0])
    if n_val:
        eval_dit(dit, sched, data, val_idx, text, mouth_map, log, f"at step {step}")
    dit.train()
    last_save, t0 = time.time(), time.time()
    ema = ema_roll = None
    budget = Budget(args.dit_minutes, args.dit_steps, step, args.deadline)

    def save() -> None:
        save_state({"dit": dit.state_dict(), "opt": opt.state_dict(), "step": step, "loss": ema}, ckpt)

    while not budget.done(step):
        g = torch.Generator(device=device).manual_seed(args.data_seed * 1_000_003 + step)
        idx = torch.randint(0, n_train, (args.dit_batch,), device=device, generator=g)
        x0 = latents[idx].float()
        i = torch.randint(0, sched.steps, (args.dit_batch,), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        sig = sigmas[i].view(-1, 1, 1, 1, 1)
        xt = (1 - sig) * x0 + sig * noise
        block0 = 0 if torch.rand((), device=device, generator=g) < 0.5 else fpb * int(
            torch.randint(0, 1000, (), device=device, generator=g))
        ci = chars[idx]
        text_kv = dit.text_kv(text.expand(args.dit_batch, -1, -1))
        sink = sink_kv(dit, refs[ci], motions[ci], text_kv)
        glob, local = encode_audio_blocks(dit, feats[idx].float())
        v = clip_velocity(dit, sink, xt, timesteps[i], glob, local, text_kv, block0)
        wmap = weight_map[ci]
        loss = ((v - (noise - x0)).pow(2) * wmap).mean() / wmap.mean()
        total = loss
        if args.rollout_weight > 0 and args.rollout_batch > 0:
            rb = min(args.rollout_batch, args.dit_batch)
            roll = rollout_loss(dit, sched, x0[:rb], sink, glob[:rb], local[:rb], text_kv, mouth_map[ci[:rb]],
                                block0, g)
            total = loss + args.rollout_weight * roll
            ema_roll = roll.item() if ema_roll is None else 0.98 * ema_roll + 0.02 * roll.item()
        optimizer_step(opt, params, total, args.dit_lr, 300, 0.05, step, budget.progress(step))
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"dit step {step} loss {ema:.4f}" + (f" rollout {ema_roll:.4f}" if ema_roll is not None else "")
                + f" ({time.time() - t0:.0f} s)")
        if time.time() - last_save > args.save_every:
            save()
            if n_val:
                eval_dit(dit, sched, data, val_idx, text, mouth_map, log, f"at step {step}")
            last_save = time.time()
    save()
    log(f"dit: stopped at step {step}, loss {ema}")
    dit.eval().requires_grad_(False)
    if n_val:
        eval_dit(dit, sched, data, val_idx, text, mouth_map, log, f"at step {step}")


# ----- command ------------------------------------------------------------------------------------------------
def build_speech_bank(path: Path, count: int, seed: int) -> None:
    """Synthesise the training utterances with espeak-ng once (the GPU host may not have it)."""
    bank = syn.speech_bank(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty(len(bank), dtype=object)
    arr[:] = bank
    np.savez_compressed(path, speech=arr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="profile whose model sizes to train (default tiny)")
    p.add_argument("--work", type=Path, default=Path("artifacts/train-tiny"), help="checkpoints and data")
    p.add_argument("--out", type=Path, default=None, help="weights file (default WORK/tiny.safetensors; the shipped "
                   "file is replaced only when named here)")
    p.add_argument("--stage", choices=["speech", "vae", "audio", "data", "dit", "decoder", "export", "all"],
                   default="all",
                   help="'decoder': after the others, fine-tune the VAE decoder on long streams decoded block by "
                   "block (latent space kept); 'export': only write the weights file from --work / --init-from")
    p.add_argument("--log-name", default="train.log", help="log file in --work (stages run side by side need two)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None, help="seed of the generated clips/streams and of batch "
                   "sampling (default --seed); a new value gives a resumed run fresh data")
    p.add_argument("--deadline", type=float, default=None, help="Unix time by which every stage stops (its LR "
                   "schedule anneals to it), whatever the --*-minutes say")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--speech", type=Path, default=None, help="speech bank .npz (default WORK/speech.npz)")
    p.add_argument("--utterances", type=int, default=96)
    p.add_argument("--extra-characters", type=int, default=12, help="random characters besides the built-ins")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-latents", type=int, default=2, help="clip length 1 + 4k frames")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=syn.SIZE, help="train the VAE on square crops of this size")
    p.add_argument("--decoder-latents", type=int, default=60,
                   help="decoder stage: stream length in latents after the reference (4 frames each)")
    p.add_argument("--decoder-streams", type=int, default=64, help="decoder stage: streams rendered for training")
    p.add_argument("--decoder-batch", type=int, default=4)
    p.add_argument("--decoder-tbptt", type=int, default=2, help="blocks of 3 latents per backprop window")
    p.add_argument("--decoder-noise", type=float, default=0.3, help="largest σ of the noise added to latents")
    p.add_argument("--decoder-lr", type=float, default=2e-4, help="peak LR (1e-3 wrecked the decoder in a CPU trial)")
    p.add_argument("--decoder-steps", type=int, default=100000, help="optimizer steps (windows) at most")
    p.add_argument("--decoder-minutes", type=float, default=None)
    p.add_argument("--decoder-mouth-weight", type=float, default=4.0)
    p.add_argument("--decoder-temporal", type=float, default=1.0, help="weight of the frame-difference loss")
    p.add_argument("--decoder-colour", type=float, default=1.0, help="weight of the 8x8-mean colour loss")
    p.add_argument("--decoder-val-latents", type=int, default=36, help="held-out streams' length for the eval")
    p.add_argument("--decoder-val-streams", type=int, default=len(syn.BUILTIN),
                   help="held-out streams (one per built-in character in turn)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--init-from", type=Path, default=None, help="folder with vae.pt / dit.pt / audio.pt (/ decoder.pt "
                   "for the decoder and export stages) to start from (weights only: fine-tuning with new settings)")
    p.add_argument("--mouth-weight", type=float, default=8.0, help="flow-matching loss weight in the mouth box")
    p.add_argument("--rollout-weight", type=float, default=1.0,
                   help="weight of the mouth loss on the model's own sampling trajectory (0: off)")
    p.add_argument("--rollout-batch", type=int, default=4, help="clips of each DiT batch that also get it")
    p.add_argument("--val-clips", type=int, default=8, help="DiT clips held out for the periodic eval")
    p.add_argument("--clips", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=16)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--vae-minutes", type=float, default=None, help="time budget for the VAE stage (stops early)")
    p.add_argument("--audio-clips", type=int, default=512, help="audio stage: composed clips of --blocks blocks")
    p.add_argument("--audio-val-clips", type=int, default=48, help="audio stage: clips of held-out utterances")
    p.add_argument("--audio-steps", type=int, default=1500)
    p.add_argument("--audio-batch", type=int, default=64, help="audio stage: block windows per step")
    p.add_argument("--audio-lr", type=float, default=3e-3)
    p.add_argument("--audio-minutes", type=float, default=None, help="time budget for the audio stage")
    p.add_argument("--dit-minutes", type=float, default=None, help="time budget for the DiT stage (stops early)")


def main(args: argparse.Namespace) -> int:
    from model.stack import resolve_device

    settings = load_settings(args.config)
    work = Path(args.work)
    out = args.out or work / "tiny.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    args.speech = args.speech or work / "speech.npz"
    if args.data_seed is None:
        args.data_seed = args.seed
    logf = open(work / args.log_name, "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.stage in ("speech", "all") and not Path(args.speech).exists():
        build_speech_bank(Path(args.speech), args.utterances, args.seed)
        log(f"speech bank: {args.speech}")
    if args.stage == "speech":
        return 0
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the decoder stage's 3-D convs: a few fixed shapes, few channels
    stack = build_stack(settings, device)

    def load(name: str, module, folder: Path, key: str | None = None) -> bool:
        path = folder / f"{name}.pt"
        if path.exists():
            module.load_state_dict(torch.load(path, map_location=device)[key or name])
            log(f"{name}: weights from {path}")
        return path.exists()

    probe = AudioProbe(stack.wav2vec2).to(device)
    if args.init_from is not None:
        # weights only, where --work has none of its own (a resumed stage loads its own checkpoint below)
        for name, module in (("vae", stack.vae), ("dit", stack.dit), ("audio", probe)):
            if not (work / f"{name}.pt").exists():
                load(name, module, args.init_from)
    if args.stage in ("vae", "all"):
        train_vae(stack, args, log)
    else:
        load("vae", stack.vae, work)
    if args.stage in ("audio", "all"):
        train_audio(probe, args, log, settings.stream)
    else:
        load("audio", probe, work)
    if args.stage in ("decoder", "export"):
        if args.init_from is not None and not (work / "decoder.pt").exists():
            load("decoder", stack.vae, args.init_from, "vae")  # a decoder stage's result: the same encoder
        load("dit", stack.dit, work)
    if args.stage == "decoder":
        train_decoder(stack, args, log)  # resumes from work/decoder.pt
    if args.stage == "export":
        load("decoder", stack.vae, work, "vae")
    if args.stage in ("data", "dit", "all"):
        data = make_data(stack, args, log)
        if args.stage in ("dit", "all"):
            train_dit(stack, data, args, log)
        else:
            load("dit", stack.dit, work)
    save_weights(Path(out), stack)
    log(f"wrote {out}")
    return 0
