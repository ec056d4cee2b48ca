"""The shipped built-in avatar (configs/tiny.yaml + assets/tiny/tiny.safetensors) on held-out speech.

tests/assets/heldout_speech.wav is espeak-ng speech in a voice (pt+m7) and text that training never used,
followed by 2 s of silence. Frames come from the real StreamEngine (4-step streaming sampling, KV rings, streaming
VAE decode, frame ring) on CPU; every number is measured on the output pixels.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_stream_inputs
from train import synthetic as syn

ASSETS = Path(__file__).parents[1] / "assets"
SPEECH = ASSETS / "heldout_speech.wav"


def _speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        assert w.getframerate() == syn.SAMPLE_RATE and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def stack():
    from live.engine.stream import ProfileStack
    from live.settings import load_settings

    settings = load_settings("configs/tiny.yaml")
    assert settings.weights is not None and settings.weights.is_file(), "tiny profile must ship its weights"
    return ProfileStack.from_settings(settings)


def _render(stack, ch: syn.Character, pcm: np.ndarray, seed: int = 0) -> np.ndarray:
    from cli.face_report import stream_frames

    return stream_frames(stack, ch, pcm, seed)


@pytest.fixture(scope="module")
def talking(stack):
    torch.manual_seed(0)
    pcm = _speech()
    return pcm, _render(stack, syn.BUILTIN[0], pcm)


def test_shipped_checkpoint_is_small_and_loads_strictly(stack):
    from live.settings import load_settings

    weights = load_settings("configs/tiny.yaml").weights
    assert weights.stat().st_size <= 10 * 1024 * 1024
    assert stack.settings.video.size_area == "192*192"


def test_mouth_opening_follows_the_speech_envelope(talking):
    pcm, frames = talking
    level = 10 ** (syn.frame_energy_db(pcm, len(frames)) / 20)
    measured = syn.mouth_openness(frames, syn.BUILTIN[0])
    r = np.corrcoef(measured, level)[0, 1]
    print(f"openness/envelope r = {r:.3f}")
    assert r >= 0.5


def test_mouth_stays_closed_in_silence_while_idle_motion_goes_on(talking):
    pcm, frames = talking
    db = syn.frame_energy_db(pcm, len(frames))
    loud = np.nonzero(db > -45)[0]
    silent = np.arange(loud.max() + 8, len(frames))  # 0.32 s after the last speech frame
    assert silent.size >= 25
    measured = syn.mouth_openness(frames[silent], syn.BUILTIN[0])
    speaking = syn.mouth_openness(frames[loud], syn.BUILTIN[0])
    print(f"silence openness max {measured.max():.3f}, speech mean {speaking.mean():.3f}")
    assert measured.max() < 0.15 and measured.max() < speaking.mean()
    head = frames[silent][:, 20:140, 40:152].astype(np.int16)
    motion = np.abs(head[12:] - head[:-12]).mean(axis=(1, 2, 3))
    assert motion.min() > 0.05  # something moves within every 12 silent frames


def test_no_seams_at_block_boundaries(stack, talking):
    _, frames = talking
    n = stack.dit.config.frames_per_block * 4  # video frames per block
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    # diffs[j] is between frames j and j+1; a block boundary is between n·k-1 and n·k
    boundary = diffs[np.arange(n - 1, len(diffs), n)]
    within = np.delete(diffs, np.arange(n - 1, len(diffs), n))
    p_b, p_w = np.percentile(boundary, 95), np.percentile(within, 95)
    print(f"frame difference p95: boundary {p_b:.3f}, within {p_w:.3f}")
    assert p_b <= p_w


@pytest.mark.parametrize("ch", syn.BUILTIN, ids=lambda c: c.name)
def test_identity_colours_match_the_reference(stack, ch):
    pcm = np.zeros(syn.SAMPLE_RATE * 2 // 5, np.float32)
    frames = _render(stack, ch, pcm).astype(np.float32)
    ref = np.asarray(syn.reference_image(ch), np.float32)
    regions = {"background": (slice(4, 40), slice(4, 40)), "skin": _cheek(ch),
               "shirt": (slice(178, 190), slice(80, 112))}
    for name, (ys, xs) in regions.items():
        want = ref[ys, xs].reshape(-1, 3).mean(0)
        got = frames[:, ys, xs].reshape(-1, 3).mean(0)
        assert np.abs(got - want).max() < 25, f"{ch.name} {name}: {got.round()} vs {want.round()}"


def _cheek(ch: syn.Character) -> tuple[slice, slice]:
    cx, cy = ch.head_center
    fw = ch.face_w * syn.SIZE
    x = int(cx - 0.3 * fw)
    return slice(int(cy + 8), int(cy + 16)), slice(x - 4, x + 4)


def test_training_forward_equals_streaming_inference(stack):
    """train-tiny's clip forward (all blocks at once, differentiable) is forward_block's maths: same velocities as
    the streaming path over 6 blocks (KV ring wrap included) at two denoising steps."""
    dit = stack.dit
    h = w = 8
    ref, motion, feats, noisy = random_stream_inputs(dit, 6, h)
    text_kv = dit.text_kv(stack.text_encoder.encode("hello"))
    f = dit.config.frames_per_block
    for step in (0, 2):
        t = stack.schedule.timesteps[step].expand(1)
        caches = dit.new_caches(stack.schedule.steps, h, w)
        dit.prefill_sink(caches, ref, motion, text_kv)
        streamed = torch.cat([dit.forward_block(noisy[:, :, f * j:f * j + f], t, dit.encode_audio(feats[:, j]), text_kv,
                                                caches, step, f * j) for j in range(6)], dim=2)
        with torch.no_grad():
            glob, local = dit.encode_audio_blocks(feats)
            whole = dit.clip_velocity(dit.sink_kv(ref, motion, text_kv), noisy, t, glob, local, text_kv)
        assert torch.allclose(whole, streamed, atol=1e-4, rtol=1e-4)
