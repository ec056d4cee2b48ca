"""``live-avatar train-tiny``: train the built-in avatar (tiny Wan VAE + tiny causal S2V DiT) on synthetic faces.

Stages, each resumable from ``--work`` (checkpoints every ``--save-every`` seconds):

1. ``vae``: the tiny ``AutoencoderKLWan`` as an autoencoder on short generated clips (1 + 4k frames), with the
   mouth box weighted up; then the latent statistics are folded into its ``quant_conv`` / ``post_quant_conv`` so
   the normalised latents the DiT sees (``(mu - mean) / std`` with the stock Wan mean/std) have zero mean and
   unit variance per channel.
2. ``data``: clips of ``blocks`` × 12 frames rendered from composed audio (speech / silence / tones), encoded as
   the engine decodes them (the reference frame first, so the decoder cache is primed by it), with the audio
   features of every block computed by the engine's own :class:`~model.audio_features.FrameAudioFeatures` over the
   same windows :class:`~live.audio_window.AudioWindow` hands out.
3. ``dit``: flow matching, block-causally: per clip one denoising step ``i`` of the 4-step schedule; every block
   is noised to ``σ_i`` and attends to the sink and the previous ``kv_cache_frames`` latent frames at the same
   noise level — exactly what the step-``i`` KV ring holds at inference. :func:`clip_velocity` is that forward
   over all blocks at once, built from the DiT's own pieces (see its test for equality with ``forward_block``).

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

from model.audio_features import FrameAudioFeatures
from model.dit import NOISY_MASK_ID, REF_MASK_ID, MOTION_MASK_ID, CausalS2VDiT, block_qkv, _dtype
from model.rope import apply_rope, grid_positions, rope_cos_sin
from model.vae import encode_video

from . import synthetic as syn
from .settings import Settings, load_settings

FRAMES_PER_BLOCK = 12


# ----- block-causal training forward ---------------------------------------------------------------------
def sink_kv(dit: CausalS2VDiT, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
            text_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (reference K un-roped, sink K roped, sink V) — :meth:`CausalS2VDiT.prefill_sink` without the
    cache writes, differentiable."""
    c = dit.config
    ref_tokens, (_, hp, wp) = dit._patchify(dit.patch_embedding, ref_latent)
    mot_tokens, mot_pos = dit.frame_packer(motion_latents)
    n_ref = ref_tokens.shape[1]
    mask = dit.trainable_cond_mask.weight
    x = torch.cat([ref_tokens + mask[REF_MASK_ID], mot_tokens + mask[MOTION_MASK_ID]], dim=1).float()
    positions = torch.cat([grid_positions([c.ref_rope_index], hp, wp), mot_pos], dim=0)
    cos, sin = (t.to(x.device) for t in rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_fp16_factors))
    _, e0 = dit._time(torch.zeros(x.shape[0], device=x.device))
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
    from .engine import ModelStack

    s = settings.model_copy(update={"weights": None, "device": "cpu", "dtype": "float32", "threads": 0})
    stack = ModelStack.load(s)
    for m in (stack.dit, stack.vae, stack.wav2vec2, stack.text_encoder):
        m.to(device)
    return stack


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


def _mouth_weight(chars: list[syn.Character], idx: list[int], device: torch.device) -> torch.Tensor:
    w = torch.ones(len(idx), 1, 1, syn.SIZE, syn.SIZE, device=device)
    for b, i in enumerate(idx):
        x0, y0, x1, y1 = chars[i].mouth_box()
        w[b, :, :, y0:y1, x0:x1] = 8.0
        cx, cy = chars[i].head_center
        w[b, :, :, int(cy - 25):int(cy + 5), int(cx - 35):int(cx + 35)] *= 3.0  # eyes
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


def train_vae(stack, args, log, decoder_only: bool = False) -> None:
    """Train the VAE as an autoencoder; ``decoder_only`` fine-tunes the decoder on long clips with the encoder (and
    so the latent space the DiT was trained in) frozen — the causal decoder must be stable over a whole stream,
    not only over the few latents of the first stage's clips."""
    device = next(stack.vae.parameters()).device
    vae = stack.vae
    chars = _characters(args.seed, args.extra_characters)
    ckpt = Path(args.work) / ("decoder.pt" if decoder_only else "vae.pt")
    params = (list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())) if decoder_only else list(
        vae.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    if state_done(ckpt):
        return
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    pool = _worker_pool(args)
    last_save = time.time()
    frames = 1 + 4 * (args.decoder_latents if decoder_only else args.vae_latents)
    budget = _Budget(args.decoder_minutes if decoder_only else args.vae_minutes, args.vae_steps, step)
    while not budget.done(step):
        rng = np.random.default_rng([args.seed, 1, step])
        idx = [int(v) for v in rng.integers(0, len(chars), args.vae_batch)]
        seeds = [int(v) for v in rng.integers(0, 2**31, args.vae_batch)]
        clips = pool.starmap(_vae_clip_job, [(chars[i], frames, s) for i, s in zip(idx, seeds)])
        video = _to_video(np.stack(clips), device)
        w = _mouth_weight(chars, idx, device)
        if args.vae_crop < syn.SIZE:  # the VAE is convolutional: crops (mostly around the mouth) are cheaper
            video, w = _crop(video, w, chars, idx, args.vae_crop, rng)
        if decoder_only:
            with torch.no_grad():
                posterior = vae.encode(video).latent_dist
        else:
            posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.mode()).sample
        err = (recon - video).abs() * w
        loss = err.mean() / w.mean() + 1e-4 * posterior.mode().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * budget.progress(step))))
        opt.step()
        step += 1
        if step % (10 if decoder_only else 50) == 0:
            log(f"{'decoder' if decoder_only else 'vae'} step {step} loss {loss.item():.4f}")
        if time.time() - last_save > args.save_every:
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last_save = time.time()
    vae.eval().requires_grad_(False)
    if not decoder_only:
        _fold_latent_stats(stack, chars, args, log)
    torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "done": True}, ckpt)
    log(f"{'decoder' if decoder_only else 'vae'}: done at step {step}")


def state_done(path: Path) -> bool:
    return path.exists() and bool(torch.load(path, map_location="cpu").get("done"))


class _Budget:
    """Training progress in [0, 1] by steps, or by wall time when a budget in minutes is given (the LR schedule
    follows it, so a time-boxed run still anneals)."""

    def __init__(self, minutes: float | None, steps: int, start_step: int) -> None:
        self.seconds = None if minutes is None else minutes * 60
        self.steps, self.t0, self.start_step = steps, time.time(), start_step

    def progress(self, step: int) -> float:
        if self.seconds is None:
            return min(1.0, step / self.steps)
        return min(1.0, (time.time() - self.t0) / self.seconds)

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.seconds is not None and self.progress(step) >= 1.0)


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
    bank = [np.asarray(a, np.float32) for a in np.load(args.speech, allow_pickle=True)["speech"]]
    st = stack.settings.stream
    block_samples = syn.SAMPLE_RATE * FRAMES_PER_BLOCK // syn.FPS
    left = round(st.audio_left_context_s * syn.SAMPLE_RATE)
    ahead = round(st.audio_lookahead_s * syn.SAMPLE_RATE)
    feats_fn = FrameAudioFeatures(stack.wav2vec2, syn.SAMPLE_RATE, syn.FPS)
    frames = FRAMES_PER_BLOCK * args.blocks
    pool = _worker_pool(args)
    lat, feats, char_idx, opens = [], [], [], []
    rng = np.random.default_rng(args.seed + 11)
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
        for (ci, audio, _, _), (_, opening) in zip(jobs, outs):
            padded = np.concatenate([np.zeros(left, np.float32), audio, np.zeros(block_samples + ahead, np.float32)])
            per_block = []
            for k in range(args.blocks):
                window = padded[k * block_samples: k * block_samples + left + block_samples + ahead]
                per_block.append(feats_fn(window, k * block_samples - left, k * FRAMES_PER_BLOCK, FRAMES_PER_BLOCK)[0])
            feats.append(torch.stack(per_block).half().cpu())
            char_idx.append(ci)
            opens.append(torch.from_numpy(opening))
        log(f"data: {start + len(jobs)}/{args.clips} clips ({time.time() - t0:.0f} s)")
    refs, motions = [], []
    dit_cfg = stack.dit.config
    for ch in chars:
        pixels = _to_video(np.asarray(syn.reference_image(ch))[None, None], device)
        refs.append(encode_video(stack.vae, pixels)[0].cpu())
        motions.append(encode_video(stack.vae, pixels.expand(-1, -1, dit_cfg.motion_frames, -1, -1))[0].cpu())
    data = {"latents": torch.cat(lat), "features": torch.stack(feats), "char": torch.tensor(char_idx),
            "openness": torch.stack(opens), "ref": torch.stack(refs), "motion": torch.stack(motions)}
    torch.save(data, path)
    return data


# ----- stage 3: DiT -------------------------------------------------------------------------------------------
def train_dit(stack, data: dict, args, log) -> None:
    device = next(stack.dit.parameters()).device
    dit, sched = stack.dit, stack.schedule
    ckpt = Path(args.work) / "dit.pt"
    params = [p for p in dit.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        dit.load_state_dict(state["dit"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"dit: resumed at step {step}")
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
    weight_map = torch.ones(len(chars_all), 1, 1, lh, lw, device=device)
    for n, ch in enumerate(chars_all):
        x0, y0, x1, y1 = ch.mouth_box()
        weight_map[n, :, :, y0 // 8: -(-y1 // 8), x0 // 8: -(-x1 // 8)] = args.mouth_weight
    dit.train()
    last_save, t0 = time.time(), time.time()
    ema = None
    budget = _Budget(args.dit_minutes, args.dit_steps, step)
    while not budget.done(step):
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, latents.shape[0], (args.dit_batch,), device=device, generator=g)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for grp in opt.param_groups:
            grp["lr"] = args.dit_lr * min(1.0, (step + 1) / 300) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * budget.progress(step))))
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"dit step {step} loss {ema:.4f} ({time.time() - t0:.0f} s)")
        if time.time() - last_save > args.save_every:
            torch.save({"dit": dit.state_dict(), "opt": opt.state_dict(), "step": step, "loss": ema}, ckpt)
            last_save = time.time()
    torch.save({"dit": dit.state_dict(), "opt": opt.state_dict(), "step": step, "loss": ema}, ckpt)
    log(f"dit: stopped at step {step}, loss {ema}")
    dit.eval().requires_grad_(False)


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
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the profile's weights path)")
    p.add_argument("--stage", choices=["speech", "vae", "data", "dit", "decoder", "all"], default="all",
                   help="'decoder': after the others, fine-tune the VAE decoder on long clips (latent space kept)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--speech", type=Path, default=None, help="speech bank .npz (default WORK/speech.npz)")
    p.add_argument("--utterances", type=int, default=96)
    p.add_argument("--extra-characters", type=int, default=12, help="random characters besides the built-ins")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-latents", type=int, default=2, help="clip length 1 + 4k frames")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--decoder-latents", type=int, default=8, help="decoder stage: clip length 1 + 4k frames")
    p.add_argument("--decoder-minutes", type=float, default=None)
    p.add_argument("--vae-crop", type=int, default=syn.SIZE, help="train the VAE on square crops of this size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--init-from", type=Path, default=None, help="folder with vae.pt / dit.pt to start from "
                   "(weights only: fine-tuning with new settings)")
    p.add_argument("--mouth-weight", type=float, default=8.0, help="flow-matching loss weight in the mouth box")
    p.add_argument("--clips", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=16)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--vae-minutes", type=float, default=None, help="time budget for the VAE stage (stops early)")
    p.add_argument("--dit-minutes", type=float, default=None, help="time budget for the DiT stage (stops early)")


def main(args: argparse.Namespace) -> int:
    from .engine import resolve_device

    settings = load_settings(args.config)
    out = args.out or settings.weights or Path("assets/tiny/tiny.safetensors")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.speech = args.speech or work / "speech.npz"
    logf = open(work / "train.log", "a")

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
    stack = build_stack(settings, device)
    if args.init_from is not None:
        for name, module in (("vae", stack.vae), ("dit", stack.dit)):
            if (args.init_from / f"{name}.pt").exists() and not (work / f"{name}.pt").exists():
                module.load_state_dict(torch.load(args.init_from / f"{name}.pt", map_location=device)[name])
                log(f"{name}: initialised from {args.init_from / f'{name}.pt'}")
    vae_ckpt = work / "vae.pt"
    if args.stage in ("vae", "all"):
        train_vae(stack, args, log)
    elif vae_ckpt.exists():
        stack.vae.load_state_dict(torch.load(vae_ckpt, map_location=device)["vae"])
    if args.stage == "decoder":
        if (work / "dit.pt").exists():
            stack.dit.load_state_dict(torch.load(work / "dit.pt", map_location=device)["dit"])
        if (work / "decoder.pt").exists():
            stack.vae.load_state_dict(torch.load(work / "decoder.pt", map_location=device)["vae"])
        train_vae(stack, args, log, decoder_only=True)
    if args.stage in ("data", "dit", "all"):
        data = make_data(stack, args, log)
        if args.stage in ("dit", "all"):
            train_dit(stack, data, args, log)
        elif (work / "dit.pt").exists():
            stack.dit.load_state_dict(torch.load(work / "dit.pt", map_location=device)["dit"])
    save_weights(Path(out), stack)
    log(f"wrote {out}")
    return 0
