"""train-tiny's ``vae`` stage: the tiny Wan VAE as an autoencoder on short generated clips (mouth and eyes weighted
up), then its latent statistics folded into ``quant_conv`` / ``post_quant_conv`` so the normalised latents the DiT
sees are zero-mean and unit-variance per channel."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.stack import ModelStack
from model.vae import encode_video
from train import synthetic as syn
from train.clips import characters, to_video, worker_pool
from train.loop import Budget, optimizer_step, resume, save_state, state_done


def _random_poses(frames: int, rng: np.random.Generator) -> list[syn.FaceState]:
    """Random mouth trajectories with idle motion (VAE training needs poses, not audio)."""
    idle = syn.idle_motion(frames, rng, start=int(rng.integers(0, 2000)))
    o = np.clip(np.cumsum(rng.normal(0, 0.35, frames)) * rng.uniform(0, 1) + rng.uniform(-0.3, 0.8), 0, 1)
    o = o * (rng.random(frames) > 0.15)
    r = np.clip(rng.uniform(0, 1) + np.cumsum(rng.normal(0, 0.2, frames)), 0, 1)
    return [syn.FaceState(float(a), float(b), *m) for a, b, m in zip(o, r, idle)]


def _random_face_clip(ch: syn.Character, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Frames ``[frames, H, W, 3]`` uint8 of ``ch`` in random poses."""
    return np.stack([syn.render_frame(ch, st) for st in _random_poses(frames, rng)])


def _vae_clip_job(ch: syn.Character, frames: int, seed: int, mouth_w: float, feature_w: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A random-pose clip and its per-pixel loss weight ``[frames, H, W]`` (float16): ``mouth_w`` where the mouth is
    drawn, ``feature_w`` on the other facial features (eyes, brows, nose, accessories: thin strokes that a loss
    averaged over the frame lets fade), 1 elsewhere."""
    frames_out, weights = [], []
    for st in _random_poses(frames, np.random.default_rng(seed)):
        frame, masks = syn.feature_masks(ch, st)
        others = np.max([m for name, m in masks.items() if name != "mouth"], axis=0)
        weights.append(1 + (mouth_w - 1) * masks["mouth"] + (feature_w - 1) * others * (1 - masks["mouth"]))
        frames_out.append(frame)
    return np.stack(frames_out), np.stack(weights).astype(np.float16)


def _crop(video: torch.Tensor, w: torch.Tensor, chars, idx, size: int, rng: np.random.Generator):
    vs, ws = [], []
    for b, i in enumerate(idx):
        if rng.random() < 0.7:
            x0, y0, x1, y1 = chars[i].mouth_box()
            cx, cy = (x0 + x1) // 2 + int(rng.integers(-size // 3, size // 3 + 1)), (y0 + y1) // 2 + int(
                rng.integers(-size // 3, size // 3 + 1))
        else:
            cx, cy = (int(v) for v in rng.integers(size // 2, chars[i].size - size // 2 + 1, 2))
        left = min(max(cx - size // 2, 0), chars[i].size - size) // 8 * 8
        top = min(max(cy - size // 2, 0), chars[i].size - size) // 8 * 8
        vs.append(video[b, :, :, top:top + size, left:left + size])
        ws.append(w[b, :, :, top:top + size, left:left + size])
    return torch.stack(vs), torch.stack(ws)


def train_vae(stack: ModelStack, args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Train the VAE as an autoencoder on short clips (``1 + 4·vae_latents`` frames decoded in one call). The
    decoder's long-stream behaviour is the ``decoder`` stage's job (:func:`train.decoder_stage.train_decoder`).
    Resumable from ``WORK/vae.pt``."""
    device = next(stack.vae.parameters()).device
    vae = stack.vae
    chars = characters(args.seed, args.extra_characters, args.frame_size)
    ckpt = Path(args.work) / "vae.pt"
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    step = resume(ckpt, "vae", vae, opt, device, log)
    if state_done(ckpt):
        return
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    pool = worker_pool(args.workers)
    last_save = time.time()
    frames = 1 + 4 * args.vae_latents
    budget = Budget(args.vae_minutes, args.vae_steps, step, args.deadline)
    while not budget.done(step):
        rng = np.random.default_rng([args.seed, 1, step])
        idx = [int(v) for v in rng.integers(0, len(chars), args.vae_batch)]
        seeds = [int(v) for v in rng.integers(0, 2**31, args.vae_batch)]
        clips = pool.starmap(_vae_clip_job, [(chars[i], frames, s, args.mouth_weight, args.vae_feature_weight)
                                             for i, s in zip(idx, seeds)])
        video = to_video(np.stack([c[0] for c in clips]), device)
        # the weights reach 2 px around each stroke: a feature blurred into the skin beside it costs too
        w = torch.nn.functional.max_pool3d(torch.from_numpy(np.stack([c[1] for c in clips])).to(device).float()[:, None],
                                           (1, 5, 5), 1, (0, 2, 2))
        if args.vae_crop is not None and args.vae_crop < chars[0].size:  # convolutional: crops are cheaper
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


@torch.no_grad()
def _fold_latent_stats(stack, chars, args, log) -> None:
    """Make ``encode_video``'s normalised latents zero-mean unit-variance per channel by an exact affine change of
    the latent space folded into ``quant_conv`` (mu rows) and ``post_quant_conv`` (inputs)."""
    vae = stack.vae
    device = next(vae.parameters()).device
    rng = np.random.default_rng(args.seed + 3)
    clips = [_random_face_clip(chars[int(rng.integers(len(chars)))], 9, rng) for _ in range(32)]
    z = encode_video(vae, to_video(np.stack(clips), device))
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
    z2 = encode_video(vae, to_video(np.stack(clips), device))
    log(f"vae: folded latent stats (before mean {mean.abs().mean():.3f} std {std.mean():.3f}; "
        f"after mean {z2.mean(dim=(0, 2, 3, 4)).abs().mean():.3f} std {z2.std(dim=(0, 2, 3, 4)).mean():.3f})")
