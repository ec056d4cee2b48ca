"""The engine loads a checkpoint folder in the exact official layout (tiny sizes) and renders from it."""

from __future__ import annotations

import numpy as np
import pytest

from cli.render import render
from live.engine.stream import ProfileStack, StreamEngine
from tests.conftest import make_speechlike
from tests.tiny_checkpoint import tiny_lora_path, write_tiny_checkpoint


@pytest.fixture(scope="module")
def official_settings(tiny_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    folder = write_tiny_checkpoint(root, tiny_settings.model)
    return tiny_settings.model_copy(update={"checkpoint_dir": folder, "lora": tiny_lora_path(root)})


def test_engine_runs_end_to_end_from_official_folder(official_settings):
    stack = ProfileStack.from_settings(official_settings)
    assert stack.dit.config.dim == official_settings.model.dit.dim
    eng = StreamEngine(stack, seed=1)
    eng.start(prompt="a person talking")
    eng.push_audio(make_speechlike(1.2))
    produced = 0
    while eng.block_ready():
        produced += eng.generate_block()
    frames = [eng.ring.get_nowait() for _ in range(produced)]
    assert produced >= 24
    stacked = np.stack([f.numpy() for f in frames])
    assert stacked.shape[1:] == (eng.height, eng.width, 3)
    assert stacked.std() > 0  # the decoder produced an image, not a constant
    eng.close()


def test_render_cli_with_checkpoint_dir(official_settings, speech_wav, tmp_path):
    out = tmp_path / "official.mp4"
    result = render(official_settings, None, speech_wav, out, progress=False)
    assert out.is_file() and result.frames > 0
