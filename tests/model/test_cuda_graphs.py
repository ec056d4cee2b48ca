"""Full-ring denoising steps replayed as CUDA graphs give the eager engine's frames (CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from live.engine.stream import ProfileStack, StreamEngine
from tests.conftest import make_speechlike

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _frames(stack: ProfileStack, audio: np.ndarray, prompt_at: int | None = None) -> tuple[np.ndarray, StreamEngine]:
    eng = StreamEngine(stack, seed=5)
    eng.start(prompt="a person talking")
    eng.push_audio(audio)
    eng.finish_audio()
    frames = []
    while eng.block_ready():
        if prompt_at is not None and eng.blocks_done == prompt_at:
            eng.set_prompt("a person laughing")
        eng.generate_block()
        while (f := eng.ring.get_nowait()) is not None:
            frames.append(f.numpy())
    return np.stack(frames), eng


@pytest.mark.parametrize("prompt_at", [None, 6])
def test_graphs_replay_the_eager_steps(tiny_settings, prompt_at):
    settings = tiny_settings.model_copy(update={"device": "cuda", "threads": 0})
    eager = ProfileStack.from_settings(settings)
    graphed = ProfileStack.from_settings(settings.model_copy(update={"cuda_graphs": True}))
    assert graphed.dit.cuda_graphs and not eager.dit.cuda_graphs
    audio = make_speechlike(5.0, seed=9)  # ~10 blocks: the ring is full from block 3, every slot replays
    a, eng_a = _frames(eager, audio, prompt_at)
    b, eng_b = _frames(graphed, audio, prompt_at)
    graphs = eng_b.caches.graphs
    slots = graphed.dit.config.kv_cache_frames // graphed.dit.config.frames_per_block
    assert graphs is not None and len(graphs.graphs) == settings.stream.steps * slots
    assert eng_a.caches.graphs is None
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    eng_a.close(), eng_b.close()
