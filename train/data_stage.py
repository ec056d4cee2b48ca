"""train-tiny's ``data`` stage: the DiT's training clips, made once and kept in ``WORK/data.pt``.

Clips of ``blocks`` × 12 frames are rendered from composed audio (speech / silence / tones) and encoded as the
engine decodes them (the reference frame first, so the decoder cache is primed by it); the audio features of every
block come from the engine's own :func:`~model.audio_features.window_features` over the same windows the engine's
audio window hands out (a changed wav2vec2 needs a fresh ``data``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.audio_features import window_features
from model.stack import ModelStack
from model.vae import encode_video
from train import synthetic as syn
from train.audio import block_taps, block_windows
from train.clips import characters, data_clip_job, to_video, worker_pool
from train.loop import save_state
from train.profile import TrainingProfile


@torch.no_grad()
def make_data(stack: ModelStack, profile: TrainingProfile, args: argparse.Namespace,
              log: Callable[[str], None]) -> dict:
    """``args.clips`` clips as tensors: ``latents`` (half, the reference latent dropped), per-block audio
    ``features``, ``char`` index, ground-truth ``openness``, and per character the ``ref`` and ``motion`` latents.
    Loaded from ``WORK/data.pt`` when it exists."""
    path = Path(args.work) / "data.pt"
    if path.exists():
        return torch.load(path)
    device = next(stack.vae.parameters()).device
    chars = characters(args.seed, args.extra_characters, profile.size)
    bank = syn.load_speech_bank(args.speech)
    left, ahead = profile.audio_context_samples()
    fpb = profile.frames_per_block
    frames = fpb * args.blocks
    pool = worker_pool(args.workers)
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
        outs = pool.starmap(data_clip_job, [(chars[ci], a, s, frames, sd, args.mouth_track) for ci, a, s, sd in jobs])
        video = to_video(np.stack([o[0] for o in outs]), device)
        lat.append(encode_video(stack.vae, video)[:, :, 1:].half().cpu())
        windows = np.stack([block_windows(audio, args.blocks, left, ahead, fpb) for _, audio, _, _ in jobs])
        if start == 0:
            taps = block_taps(stack.wav2vec2, args.blocks, left, windows.shape[-1], device, fpb)
        w = torch.from_numpy(windows).to(device).flatten(0, 1)
        f = window_features(stack.wav2vec2, w, tuple(t.repeat(len(jobs), 1) for t in taps))
        feats.extend(f.unflatten(0, (len(jobs), args.blocks)).half().cpu())
        char_idx.extend(ci for ci, _, _, _ in jobs)
        opens.extend(torch.from_numpy(opening) for _, opening in outs)
        log(f"data: {start + len(jobs)}/{args.clips} clips ({time.time() - t0:.0f} s)")
    refs, motions = [], []
    dit_cfg = stack.dit.config
    for ch in chars:
        pixels = to_video(np.array(syn.reference_image(ch))[None, None], device)
        refs.append(encode_video(stack.vae, pixels)[0].cpu())
        motions.append(encode_video(stack.vae, pixels.expand(-1, -1, dit_cfg.motion_frames, -1, -1))[0].cpu())
    data = {"latents": torch.cat(lat), "features": torch.stack(feats), "char": torch.tensor(char_idx),
            "openness": torch.stack(opens), "ref": torch.stack(refs), "motion": torch.stack(motions)}
    save_state(data, path)
    return data
