"""``live-avatar train-tiny``: train the built-in avatar (tiny Wan VAE + tiny causal S2V DiT) on synthetic faces.

Stages, each resumable from ``--work`` (checkpoints every ``--save-every`` seconds), run in this order:

0. ``speech``: the speech bank (espeak-ng utterances, once; the GPU host may not have espeak-ng).
1. ``vae`` (:mod:`train.vae_stage`): the tiny ``AutoencoderKLWan`` as an autoencoder on short clips, then the
   latent statistics folded into it so the DiT's normalised latents have zero mean and unit variance per channel.
2. ``audio`` (:mod:`train.audio`): the tiny wav2vec2 learns to hear the mouth.
3. ``decoder`` (:mod:`train.decoder_stage`, after the others, encoder frozen): the VAE decoder fine-tuned on long
   streams decoded block by block as the engine does.
4. ``data`` (:mod:`train.data_stage`): the DiT's clips, latents and per-block audio features.
5. ``dit`` (:mod:`train.dit_stage`): block-causal flow matching plus the mouth on the model's own sampling.
6. ``export``: only writes the weights file from ``--work`` / ``--init-from`` (scripts/device_train_tiny.sh runs
   ``decoder`` and ``dit`` side by side on one GPU, then this).

``--stage all`` runs speech, vae, audio, data and dit. A stage not chosen that later stages build on (vae, audio)
loads its checkpoint from ``--work`` instead. The result is one safetensors file with ``dit.`` / ``vae.`` /
``wav2vec2.`` / ``text.`` prefixes that ``ModelStack.load`` reads when the profile sets ``weights``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.stack import ModelStack, load_project_weights, resolve_device
from train import synthetic as syn
from train.audio import AudioProbe, train_audio
from train.data_stage import make_data
from train.decoder_stage import train_decoder
from train.dit_stage import train_dit
from train.profile import TrainingProfile
from train.stack import build_stack, save_weights
from train.vae_stage import train_vae


@dataclass
class Run:
    """One train-tiny invocation: its arguments, profile, models and log, handed to every stage."""

    args: argparse.Namespace
    profile: TrainingProfile
    work: Path
    device: torch.device
    stack: ModelStack
    probe: AudioProbe
    log: Callable[[str], None]

    def load(self, name: str, module: torch.nn.Module, folder: Path, key: str | None = None) -> bool:
        """Load ``module`` from ``folder/NAME.pt`` (saved under ``key``, default ``name``) if that file exists."""
        path = folder / f"{name}.pt"
        if path.exists():
            module.load_state_dict(torch.load(path, map_location=self.device)[key or name])
            self.log(f"{name}: weights from {path}")
        return path.exists()


@dataclass(frozen=True)
class Stage:
    """A model stage: ``run`` when chosen; ``otherwise`` (if any) when not, to give later stages its result."""

    run: Callable[[Run], None]
    otherwise: Callable[[Run], None] | None = None


def _decoder_start(r: Run) -> None:
    """What the decoder and export stages start from: a decoder stage's VAE from --init-from (the same encoder)
    where --work has none, and the DiT from --work."""
    if r.args.init_from is not None and not (r.work / "decoder.pt").exists():
        r.load("decoder", r.stack.vae, r.args.init_from, "vae")
    r.load("dit", r.stack.dit, r.work)


def _decoder(r: Run) -> None:
    _decoder_start(r)
    train_decoder(r.stack, r.args, r.log)  # resumes from work/decoder.pt


def _export(r: Run) -> None:
    _decoder_start(r)
    r.load("decoder", r.stack.vae, r.work, "vae")


def _data(r: Run) -> None:
    make_data(r.stack, r.profile, r.args, r.log)
    r.load("dit", r.stack.dit, r.work)


def _dit(r: Run) -> None:
    train_dit(r.stack, make_data(r.stack, r.profile, r.args, r.log), r.args, r.log)


# the model stages in the order they run (the speech bank comes first and needs no models)
STAGES: dict[str, Stage] = {
    "vae": Stage(lambda r: train_vae(r.stack, r.args, r.log), lambda r: r.load("vae", r.stack.vae, r.work)),
    "audio": Stage(lambda r: train_audio(r.probe, r.args, r.log, r.profile),
                   lambda r: r.load("audio", r.probe, r.work)),
    "decoder": Stage(_decoder),
    "data": Stage(_data),
    "dit": Stage(_dit),  # makes (or loads) the data first
    "export": Stage(_export),
}
ALL = ("speech", "vae", "audio", "dit")


def build_speech_bank(path: Path, count: int, seed: int) -> None:
    """Synthesise the training utterances with espeak-ng once (the GPU host may not have it)."""
    bank = syn.speech_bank(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty(len(bank), dtype=object)
    arr[:] = bank
    np.savez_compressed(path, speech=arr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """train-tiny's command-line flags."""
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
    p.add_argument("--vae-crop", type=int, default=None, help="train the VAE on square crops of this size (default: "
                   "whole frames)")
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
    p.add_argument("--init-weights", type=Path, default=None, help="a weights file of the tiny profile's layout (e.g. "
                   "assets/tiny/tiny.safetensors) to start every model from, where --work / --init-from have none")
    p.add_argument("--init-from", type=Path, default=None, help="folder with vae.pt / dit.pt / audio.pt (/ decoder.pt "
                   "for the decoder and export stages) to start from (weights only: fine-tuning with new settings)")
    p.add_argument("--mouth-weight", type=float, default=8.0, help="flow-matching loss weight in the mouth box")
    p.add_argument("--mouth-track", choices=syn.MOUTH_TRACKS, default="visemes",
                   help="how the synthetic mouth follows speech: syllable-level 'visemes' (formants, voicing), or the "
                   "'envelope' of the energy (what the shipped checkpoint learnt)")
    p.add_argument("--vae-feature-weight", type=float, default=4.0,
                   help="VAE loss weight on the drawn eyes, brows, nose and accessories (the mouth gets --mouth-weight)")
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


def main(args: argparse.Namespace, profile: TrainingProfile) -> int:
    """Run the chosen stage(s) of ``profile``'s model and write the weights file; returns the exit status."""
    work = Path(args.work)
    out = args.out or work / "tiny.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    args.speech = args.speech or work / "speech.npz"
    args.frame_size = profile.size  # the stages draw the characters at the profile's frame size
    if args.data_seed is None:
        args.data_seed = args.seed
    with open(work / args.log_name, "a") as logf:

        def log(msg: str) -> None:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()

        chosen = ALL if args.stage == "all" else (args.stage,)
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.threads)
        if "speech" in chosen and not Path(args.speech).exists():
            build_speech_bank(Path(args.speech), args.utterances, args.seed)
            log(f"speech bank: {args.speech}")
        if chosen == ("speech",):
            return 0
        run = _start(args, profile, work, log)
        for name, stage in STAGES.items():
            if name in chosen:
                stage.run(run)
            elif stage.otherwise is not None:
                stage.otherwise(run)
        save_weights(Path(out), run.stack)
        log(f"wrote {out}")
    return 0


def _start(args: argparse.Namespace, profile: TrainingProfile, work: Path, log: Callable[[str], None]) -> Run:
    """The device, the seeded random stack and the audio probe, with --init-from's weights where --work has none."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the decoder stage's 3-D convs: a few fixed shapes, few channels
    stack = build_stack(profile, device)
    if args.init_weights is not None:
        load_project_weights(args.init_weights, {"dit": stack.dit, "vae": stack.vae, "wav2vec2": stack.wav2vec2,
                                                 "text": stack.text_encoder})
        log(f"weights from {args.init_weights}")
    run = Run(args, profile, work, device, stack, AudioProbe(stack.wav2vec2).to(device), log)
    if args.init_from is not None:
        # weights only, where --work has none of its own (a resumed stage loads its own checkpoint)
        for name, module in (("vae", stack.vae), ("dit", stack.dit), ("audio", run.probe)):
            if not (work / f"{name}.pt").exists():
                run.load(name, module, args.init_from)
    return run
