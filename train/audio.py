"""train-tiny's ``audio`` stage: the tiny wav2vec2 learns to hear what moves the mouth.

The tiny profile's wav2vec2 has the real model's architecture (layer-normalised conv feature extractor, transformer)
but no pretrained weights. Left random, its per-timestep layer norms throw away loudness and it has never learnt
speech, so its features barely carry the mouth: a linear probe on them reads the synthetic mouth opening at r ≈ 0.4
on held-out speech, and the DiT trained on them opened the mouth late and timidly. This stage trains the wav2vec2
(with a linear probe head that is then discarded) to predict each frame's mouth opening and roundness — the
synthetic data's exact ground truth (:func:`train.synthetic.mouth_track`) — from the very windows and per-frame
features the engine computes (:func:`model.audio_features.window_features`). The DiT stage then trains on the
features of the trained wav2vec2, which the shipped weights file holds under ``wav2vec2.``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import Wav2Vec2Model

from model.audio_features import frame_taps, num_hidden_frames, window_features
from train import synthetic as syn
from train.loop import Budget, optimizer_step, resume, save_state, state_done
from train.profile import TrainingProfile


def block_windows(audio: np.ndarray, blocks: int, left: int, ahead: int, frames_per_block: int = 12) -> np.ndarray:
    """The windows :class:`~live.stream.audio_window.AudioWindow` hands out for the first ``blocks`` blocks (of
    ``frames_per_block`` video frames) of a stream that starts with ``audio``: ``[blocks, left + block + ahead]``,
    zeros before the start and past the end."""
    block = syn.SAMPLE_RATE * frames_per_block // syn.FPS
    padded = np.concatenate([np.zeros(left, np.float32), audio.astype(np.float32),
                             np.zeros(max(0, blocks * block + ahead - audio.size), np.float32)])
    return np.stack([padded[k * block: k * block + left + block + ahead] for k in range(blocks)])


def block_taps(wav2vec2: Wav2Vec2Model, blocks: int, left: int, window: int, device: torch.device,
               frames_per_block: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~model.audio_features.frame_taps` of stream blocks ``0 … blocks-1`` as ``[blocks, frames_per_block]``
    tensors."""
    fpb = frames_per_block
    block = syn.SAMPLE_RATE * fpb // syn.FPS
    t50 = num_hidden_frames(wav2vec2, window)
    taps = [frame_taps(k * block - left, k * fpb, fpb, syn.FPS, t50) for k in range(blocks)]
    lo, hi, a = (torch.tensor([t[n] for t in taps], device=device) for n in range(3))
    return lo, hi, a.float()


class AudioProbe(torch.nn.Module):
    """The wav2vec2 and a linear head that reads per-frame (opening, roundness) off its per-frame features."""

    def __init__(self, wav2vec2: Wav2Vec2Model) -> None:
        super().__init__()
        self.wav2vec2 = wav2vec2
        cfg = wav2vec2.config
        self.head = torch.nn.Linear((cfg.num_hidden_layers + 1) * cfg.hidden_size, 2)

    def forward(self, windows: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``windows [B, S]`` → predicted ``[B, 2, F]`` (opening, roundness) of each window's F block frames."""
        feats = window_features(self.wav2vec2, windows, taps)  # [B, L, C, F]
        return self.head(feats.flatten(1, 2).transpose(1, 2)).transpose(1, 2)


def _mouth_dataset(bank: list[np.ndarray], clips: int, blocks: int, left: int, ahead: int,
                   rng: np.random.Generator, fpb: int, track: str) -> dict[str, np.ndarray]:
    """Composed clips (speech, silence, tones) cut into block windows of ``fpb`` frames with their frames' ground
    truth (the mouth following ``track``)."""
    win, target, level, index = [], [], [], []
    frames = fpb * blocks
    for _ in range(clips):
        audio, speech = syn.compose_audio(bank, frames / syn.FPS + 0.2, rng)
        opening, roundness = syn.track_mouth(audio, speech, frames, track)
        amp = 10 ** (syn.frame_energy_db(audio, frames) / 20)
        win.append(block_windows(audio, blocks, left, ahead, fpb))
        target.append(np.stack([opening, roundness]).reshape(2, blocks, fpb).transpose(1, 0, 2))
        level.append(amp.reshape(blocks, fpb))
        index.append(np.arange(blocks))
    return {k: np.concatenate(v) for k, v in (("windows", win), ("target", target), ("level", level),
                                               ("block", index))}


@torch.no_grad()
def eval_audio(probe: AudioProbe, val: dict[str, torch.Tensor], taps, log, tag: str) -> float:
    """Held-out speech: correlation of the probe's opening with the ground truth and with the energy envelope."""
    probe.eval()
    pred = torch.cat([probe(w, tuple(t[k] for t in taps))[:, 0]
                      for w, k in zip(val["windows"].split(256), val["block"].split(256))])
    p, y, lv = pred.flatten().cpu().numpy(), val["target"][:, 0].flatten().cpu().numpy(), val["level"].cpu().numpy()
    r = float(np.corrcoef(p, y)[0, 1])
    log(f"audio eval {tag}: opening r {r:.3f} (ground truth), {np.corrcoef(p, lv.ravel())[0, 1]:.3f} (envelope)")
    return r


def train_audio(probe: AudioProbe, args: argparse.Namespace, log: Callable[[str], None],
                profile: TrainingProfile) -> None:
    """Train ``probe`` (its wav2vec2 in place) on ``args.audio_clips`` composed clips from the speech bank; the
    last sixth of the bank's utterances is held out for :func:`eval_audio`. ``profile`` gives the audio context
    and lookahead of the windows. Resumable from ``WORK/audio.pt``."""
    device = next(probe.parameters()).device
    ckpt = Path(args.work) / "audio.pt"
    params = list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.audio_lr, weight_decay=0.01)
    step = resume(ckpt, "audio", probe, opt, device, log)
    if state_done(ckpt):
        return
    bank = syn.load_speech_bank(args.speech)
    n_val = max(1, len(bank) // 6)
    left, ahead = profile.audio_context_samples()
    rng = np.random.default_rng([args.data_seed, 5])
    t0 = time.time()
    fpb = profile.frames_per_block
    train = {k: torch.from_numpy(v).to(device)
             for k, v in _mouth_dataset(bank[:-n_val] or bank, args.audio_clips, args.blocks, left, ahead, rng,
                                        fpb, args.mouth_track).items()}
    val = {k: torch.from_numpy(v).to(device)
           for k, v in _mouth_dataset(bank[-n_val:], args.audio_val_clips, args.blocks, left, ahead, rng,
                                      fpb, args.mouth_track).items()}
    taps = block_taps(probe.wav2vec2, args.blocks, left, train["windows"].shape[1], device, fpb)
    log(f"audio: {len(train['windows'])} training windows ({time.time() - t0:.0f} s)")
    eval_audio(probe, val, taps, log, f"at step {step}")
    budget = Budget(args.audio_minutes, args.audio_steps, step, args.deadline)
    g = torch.Generator(device=device).manual_seed(args.data_seed * 1_000_003 + step)
    last_save, ema = time.time(), None
    probe.eval().requires_grad_(True)  # eval: no dropout or time masking; the features are used that way
    while not budget.done(step):
        idx = torch.randint(0, len(train["windows"]), (args.audio_batch,), device=device, generator=g)
        k = train["block"][idx]
        loss = (probe(train["windows"][idx], tuple(t[k] for t in taps)) - train["target"][idx]).pow(2).mean()
        optimizer_step(opt, params, loss, args.audio_lr, 100, 0.05, step, budget.progress(step))
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0:
            log(f"audio step {step} loss {ema:.4f} ({time.time() - t0:.0f} s)")
        if time.time() - last_save > args.save_every:
            save_state({"audio": probe.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            eval_audio(probe, val, taps, log, f"at step {step}")
            last_save = time.time()
    probe.requires_grad_(False)
    eval_audio(probe, val, taps, log, f"at step {step}")
    save_state({"audio": probe.state_dict(), "opt": opt.state_dict(), "step": step, "done": True}, ckpt)
    log(f"audio: done at step {step}")
