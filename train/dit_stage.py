"""train-tiny's ``dit`` stage: flow matching, block-causally, plus the mouth judged on the model's own sampling.

Per clip one denoising step ``i`` of the 4-step schedule: every block is noised to ``σ_i`` and attends to the sink
and the previous ``kv_cache_frames`` latent frames at the same noise level — exactly what the step-``i`` KV ring
holds at inference (:meth:`model.dit.CausalS2VDiT.clip_velocity`, tested equal to ``forward_block``). Plus
:func:`rollout_loss`: the mouth judged on the model's own sampling trajectory (:func:`sample_clips`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from model.dit import CausalS2VDiT
from model.sampler import FlowMatchSchedule
from model.stack import ModelStack
from train.clips import characters
from train.loop import Budget, optimizer_step, resume, save_state


@torch.no_grad()
def sample_clips(dit: CausalS2VDiT, sched: FlowMatchSchedule, sink, glob: torch.Tensor, local: torch.Tensor,
                 text_kv, noise: torch.Tensor, block0: int = 0, steps: int | None = None) -> list[torch.Tensor]:
    """The engine's sampler over whole clips: every block runs step ``i`` attending to the step-``i`` states of
    the blocks before it — what the step-``i`` KV ring holds at inference — so all blocks advance together.
    Returns the states before each step and the result: ``[x_0 = noise, x_1, …, x_steps]``."""
    b = noise.shape[0]
    x, states = noise, [noise]
    for i in range(sched.steps if steps is None else steps):
        t = sched.timesteps[i].to(noise.device).expand(b)
        x = sched.euler_step(x, dit.clip_velocity(sink, x, t, glob, local, text_kv, block0), i)
        states.append(x)
    return states


def _slice_kv(kv: list[tuple], n: int, detach: bool = False) -> list[tuple]:
    return [tuple((t[:n].detach() if detach else t[:n]) for t in layer) for layer in kv]


def rollout_loss(dit: CausalS2VDiT, sched: FlowMatchSchedule, x0: torch.Tensor, sink, glob, local, text_kv,
                 mouth: torch.Tensor, block0: int, generator: torch.Generator) -> torch.Tensor:
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
    v = dit.clip_velocity(_slice_kv(sink, b), xt, sched.timesteps.to(x0.device)[i], glob, local,
                          _slice_kv(text_kv, b), block0)
    x0_hat = xt - sched.sigmas.to(x0.device)[i].view(-1, 1, 1, 1, 1) * v
    m = mouth.expand_as(x0)
    return ((x0_hat - x0).pow(2) * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def eval_dit(dit: CausalS2VDiT, sched: FlowMatchSchedule, data: dict, val_idx: torch.Tensor, text: torch.Tensor,
             mouth_map: torch.Tensor, log: Callable[[str], None], tag: str) -> dict:
    """Sample the held-out clips (block 0 at stream start, fixed noise) and compare with the data: mouth-cell MSE,
    the spread of the mouth cells (generated / data: under 1 means timid openings) and, per latent frame, the
    correlation of the mouth's distance from the closed-mouth reference latent (a proxy for openness)."""
    device = next(dit.parameters()).device
    x0 = data["latents"][val_idx].to(device).float()
    ci = data["char"][val_idx].to(device)
    feats = data["features"][val_idx].to(device).float()
    text_kv = dit.text_kv(text.expand(len(val_idx), -1, -1))
    sink = dit.sink_kv(data["ref"].to(device)[ci], data["motion"].to(device)[ci], text_kv)
    glob, local = dit.encode_audio_blocks(feats)
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


def train_dit(stack: ModelStack, data: dict, args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Flow matching on ``data`` (:func:`train.data_stage.make_data`), the mouth cells weighted up, plus
    :func:`rollout_loss`; the last ``val_clips`` clips are held out for :func:`eval_dit`. Resumable from
    ``WORK/dit.pt``."""
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
    chars_all = characters(args.seed, args.extra_characters, args.frame_size)
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
        sink = dit.sink_kv(refs[ci], motions[ci], text_kv)
        glob, local = dit.encode_audio_blocks(feats[idx].float())
        v = dit.clip_velocity(sink, xt, timesteps[i], glob, local, text_kv, block0)
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
