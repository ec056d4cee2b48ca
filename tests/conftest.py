"""Shared fixtures. Sections are owned by the part of the system they serve."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


# ----- engine / model fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_settings():
    """The built-in tiny profile at 64×64 (fast enough for many blocks on 2 cores)."""
    from live.settings import load_settings

    s = load_settings("configs/tiny.yaml")
    return s.model_copy(update={"video": s.video.model_copy(update={"size_area": "64*64"})})


@pytest.fixture(scope="session")
def tiny_stack(tiny_settings):
    """One tiny ProfileStack shared by the engine tests (random weights, seed 0)."""
    from live.engine.stream import ProfileStack

    return ProfileStack.from_settings(tiny_settings)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """A few seconds of real synthetic speech (espeak-ng), 22.05 kHz mono WAV."""
    out = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "Hello, I am a live avatar. I speak whatever you say, in real time, for as long as you like."
    subprocess.run(["espeak-ng", "-s", "170", "-w", str(out), text], check=True, capture_output=True)
    return out


def make_speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Amplitude-modulated noise bursts: speech-like energy envelope without a TTS engine."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = (np.sin(2 * np.pi * 3.0 * t) > 0).astype(np.float32) * 0.3
    return (rng.standard_normal(t.size).astype(np.float32) * env).astype(np.float32)


# ----- live server fixtures (signaling/, live/session.py, live/client.py) --------------------------------
def tiny_server_settings():
    """The tiny profile as the test servers run it: RTMP pushes allowed to loopback (the tests' nginx-rtmp)."""
    from live.settings import load_settings

    s = load_settings("configs/tiny.yaml")
    return s.model_copy(update={"output": s.output.model_copy(update={"rtmp_allowed_hosts": ["127.0.0.1"]})})


@pytest.fixture(scope="session")
def server_url():
    """A real server (built-in tiny profile, max_sessions 2) in its own process on a free loopback port, with the
    API key and token secret of tests/server_helpers.py.

    Its log goes to artifacts/server-tests.log; it is interrupted (graceful shutdown) at the end.
    """
    from cli.server_process import ServerProcess
    from live.settings import AuthSettings
    from tests.server_helpers import API_KEY, TOKEN_SECRET

    settings = tiny_server_settings()
    auth = AuthSettings(api_key=API_KEY, token_secret=TOKEN_SECRET)
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"auth": auth})})
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "server-tests.log", "w") as log:
        try:
            with ServerProcess(settings, log=log) as url:
                yield url
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}; see {ARTIFACTS / 'server-tests.log'}")


@pytest.fixture(scope="session")
def speech_16k(speech_wav):
    """The speech fixture decoded to 16 kHz mono float32 (what the server's engine hears)."""
    from cli.media import read_audio_16k

    return read_audio_16k(speech_wav)


# ----- output fixtures (live/rtmp.py) -------------------------------------------------------------------
@pytest.fixture
def nginx_rtmp(tmp_path):
    """A real nginx-rtmp server on a free loopback port (skips if nginx or its RTMP module is absent)."""
    from tests.nginx_rtmp import NginxRtmp, missing

    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    server = NginxRtmp(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def random_stream_inputs(dit, blocks: int, size: int = 8, seed: int = 0) -> tuple:
    """Seeded random (reference latent, 19 motion latents, per-block audio features, noisy latents of ``blocks``
    blocks) for ``dit`` at a ``size`` × ``size`` latent: the inputs of the streaming-vs-training equality tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = dit.config
    ref = torch.randn(1, 16, 1, size, size, generator=g)
    motion = torch.randn(1, 16, 19, size, size, generator=g)
    feats = torch.randn(1, blocks, c.num_audio_layers, c.audio_dim, 4 * c.frames_per_block, generator=g)
    latents = torch.randn(1, 16, blocks * c.frames_per_block, size, size, generator=g)
    return ref, motion, feats, latents
