"""train-tiny's ``decoder`` stage (after the others, encoder frozen): the VAE decoder fine-tuned the way the engine
uses it — long streams decoded block by block, the causal cache carried, backprop truncated every few blocks — so it
stays stable over a whole stream, not only over the ``vae`` stage's short clips."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from model.stack import ModelStack
from model.vae import denormalize_latents, encode_video
from train import synthetic as syn
from train.clips import characters, data_clip_job, feature_weight, to_video, worker_pool
from train.loop import Budget, save_state


def new_decoder_cache(vae: torch.nn.Module) -> list:
    """An empty causal-conv cache for ``vae.decoder`` (what :meth:`StreamingVAEDecoder.reset` makes)."""
    return [None] * vae._cached_conv_counts["decoder"]


def decode_chunk(vae: torch.nn.Module, cache: list, latents: torch.Tensor, first: bool) -> torch.Tensor:
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


def _stream_job(ch: syn.Character, audio: np.ndarray, speech: np.ndarray, frames: int, seed: int,
                track: str) -> np.ndarray:
    return data_clip_job(ch, audio, speech, frames, seed, track)[0]


@torch.no_grad()
def make_streams(stack: ModelStack, args: argparse.Namespace, chars: list[syn.Character], count: int, latents: int,
                 seed: int, log: Callable[[str], None] | None = None) -> dict:
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
        jobs.append((chars[k % len(chars)], audio, speech, frames, int(rng.integers(2**31)), args.mouth_track))
    t0 = time.time()
    video = np.stack(worker_pool(args.workers).starmap(_stream_job, jobs))
    lat = []
    for start in range(0, count, 4):  # the encoder works through a stream 4 frames at a time: little memory
        lat.append(encode_video(stack.vae, to_video(video[start:start + 4], device)).float().cpu())
    if log is not None:
        log(f"decoder: {count} streams of {video.shape[1]} frames rendered and encoded ({time.time() - t0:.0f} s)")
    return {"frames": video, "latents": torch.cat(lat), "char": np.arange(count) % len(chars)}


@torch.no_grad()
def decode_streams(vae: torch.nn.Module, latents: torch.Tensor, chunk: int = 3) -> torch.Tensor:
    """Decode streams as the engine does: the reference latent alone (its frame dropped), then ``chunk`` latents
    at a time with the cache kept → uint8 ``[B, 4·(t-1), H, W, 3]``."""
    cache = new_decoder_cache(vae)
    decode_chunk(vae, cache, latents[:, :, :1], True)
    out = [decode_chunk(vae, cache, latents[:, :, a:a + chunk], False) for a in range(1, latents.shape[2], chunk)]
    return ((torch.cat(out, 2).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def eval_decoder(vae: torch.nn.Module, val: dict, log: Callable[[str], None], tag: str, fpb: int = 3) -> dict:
    """Long-stream health of the decoder on held-out streams decoded ``fpb`` latents at a time: PSNR per 48 frames
    (drift shows as a fall), mean frame difference at block boundaries vs within blocks (seams), largest region
    colour error (the shirt)."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    got = decode_streams(vae, val["latents"].to(device), fpb).numpy().astype(np.float32)
    vae.train(was_training)
    want = val["frames"][:, 1:].astype(np.float32)
    seg = 48
    psnr = [float(10 * np.log10(255 ** 2 / max(1e-6, ((got[:, a:a + seg] - want[:, a:a + seg]) ** 2).mean())))
            for a in range(0, got.shape[1], seg)]
    diffs = np.abs(np.diff(got, axis=1)).mean(axis=(0, 2, 3, 4))
    bi = np.arange(4 * fpb - 1, diffs.size, 4 * fpb)
    boundary = float(diffs[bi].mean()) if bi.size else float("nan")
    within = float(np.delete(diffs, bi).mean())
    size = got.shape[2]  # the shirt's box, as a fraction of the frame (178:190, 80:112 at 192)
    ys, xs = slice(round(size * 0.927), round(size * 0.99)), slice(round(size * 0.417), round(size * 0.583))
    shirt = np.abs(got[:, :, ys, xs].mean(axis=(1, 2, 3)) - want[:, :, ys, xs].mean(axis=(1, 2, 3)))
    out = {"psnr": psnr, "boundary": boundary, "within": within, "shirt": float(shirt.max())}
    log(f"decoder eval {tag}: PSNR per {seg} frames " + " ".join(f"{v:.1f}" for v in psnr)
        + f"; frame diff at block starts {boundary:.2f} vs within {within:.2f}; worst shirt colour error "
        f"{out['shirt']:.1f}")
    return out


def train_decoder(stack: ModelStack, args: argparse.Namespace, log: Callable[[str], None]) -> None:
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
    chars = characters(args.seed, args.extra_characters, args.frame_size)
    latents = -(-args.decoder_latents // fpb) * fpb
    pool = make_streams(stack, args, chars, args.decoder_streams, latents, args.data_seed, log)
    val = make_streams(stack, args, chars[:len(syn.BUILTIN)], args.decoder_val_streams, args.decoder_val_latents,
                       12345)
    eval_decoder(vae, val, log, "before", fpb)
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
        w = feature_weight(chars, [int(pool["char"][i]) for i in idx], device, args.decoder_mouth_weight,
                           args.vae_feature_weight)
        cache, prev = new_decoder_cache(vae), None
        for k in range(windows):
            a, b = k * window, min(latents, (k + 1) * window)
            parts = [decode_chunk(vae, cache, lat[:, :, :1], True)] if k == 0 else []  # the reference prime
            parts += [decode_chunk(vae, cache, lat[:, :, 1 + j:1 + min(b, j + fpb)], False) for j in range(a, b, fpb)]
            recon = torch.cat(parts, dim=2)
            f0 = 0 if k == 0 else 1 + 4 * a
            target = to_video(np.ascontiguousarray(pool["frames"][idx, f0:1 + 4 * b]), device)
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
    eval_decoder(vae, val, log, "after", fpb)
    log(f"decoder: done at step {step}")
