"""The multi-GPU step pipeline, on CPU with gloo: the single-process engine's frames at any rank count, and a
killed rank ends the stream with a clear error instead of a hang."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from cli.pipeline_bench import run_pipeline_bench
from live.engine.mesh import StagePlan
from live.engine.pipeline import PipelineEngine, PipelineRankError, pipeline_host
from live.engine.stream import ProfileStack, StreamEngine
from live.settings import PipelineSettings
from tests.conftest import make_speechlike

BLOCKS = 6         # past the rolling-sink refresh at block 4 (kv_cache_frames 12 / 3 frames per block)
PROMPT_AT = 2      # a prompt change takes effect from this block
FAIL_WITHIN_S = 20.0


def pipeline_settings(base, world_size: int, decode_on: str = "last"):
    """``base`` as a gloo pipeline of ``world_size`` ranks."""
    return base.model_copy(update={"pipeline": PipelineSettings(world_size=world_size, backend="gloo",
                                                                 decode_on=decode_on)})


def run(engine, audio: np.ndarray, blocks: int) -> tuple[list[torch.Tensor], int]:
    """Push all audio first (blocks queue up, the pipeline fills), change the prompt before block PROMPT_AT, and
    collect ``blocks`` blocks of frames. Also returns the most blocks started ahead of the last one delivered."""
    engine.start()
    engine.push_audio(audio)
    frames: list[torch.Tensor] = []
    ahead, prompted = 0, False
    want = blocks * engine.frames_per_block - engine.drop_first
    while len(frames) < want:
        assert engine.block_ready()
        started = getattr(engine, "blocks_submitted", engine.blocks_started)
        if started == PROMPT_AT and not prompted:
            engine.set_prompt("a person smiling")
            prompted = True
        engine.generate_block()
        ahead = max(ahead, getattr(engine, "blocks_submitted", engine.blocks_started) - engine.blocks_done)
        while (f := engine.ring.get_nowait()) is not None:
            frames.append(f)
    return frames, ahead


def assert_same_frames(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"frame {i} differs (max |diff| {(a.int() - b.int()).abs().max()})"


@pytest.fixture(scope="module")
def base(tiny_settings):
    """The tiny 64×64 profile streaming as the 14B profile does: rolling-sink refresh on, 3 frames dropped."""
    stream = tiny_settings.stream.model_copy(update={"refresh_sink": True, "drop_first_frames": 3})
    return tiny_settings.model_copy(update={"stream": stream})


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return make_speechlike(3.2, seed=5)


@pytest.fixture(scope="module")
def reference(base, audio) -> list[torch.Tensor]:
    """Frames of the single-process engine (same seed, audio and prompt change)."""
    engine = StreamEngine(ProfileStack.from_settings(base), seed=0)
    frames, ahead = run(engine, audio, BLOCKS)
    engine.close()
    assert ahead == 1  # with the audio ahead, one block decodes in the background while the next is denoised
    return frames


def test_steps_go_round_robin_over_any_rank_count():
    assert [StagePlan(3, 4).owned_steps(r) for r in range(3)] == [(0, 3), (1,), (2,)]
    assert [StagePlan(2, 4).owned_steps(r) for r in range(2)] == [(0, 2), (1, 3)]
    assert StagePlan(1, 4).owned_steps(0) == (0, 1, 2, 3) and StagePlan(1, 4).decode_rank == 0
    own = StagePlan(3, 4, "own")
    assert [own.owned_steps(r) for r in range(3)] == [(0, 2), (1, 3), ()] and own.decode_rank == 2
    five = StagePlan(5, 4)  # one more rank than steps: the last rank only decodes
    assert five.owned_steps(4) == () and five.decode_rank == 4
    # 4 steps on 3 ranks: the block goes round the ring 0 → 1 → 2 → 0, then to the decoder on rank 2
    assert [StagePlan(3, 4).after(s) for s in range(4)] == [1, 2, 0, 2]
    for bad in (dict(world_size=6, steps=4), dict(world_size=1, steps=4, decode_on="own")):
        with pytest.raises(ValueError):
            StagePlan(**bad)


def test_one_rank_gives_the_stream_engines_frames(base, audio, reference):
    stack = ProfileStack.from_settings(pipeline_settings(base, 1))
    engine = PipelineEngine(stack, seed=0)
    frames, _ = run(engine, audio, BLOCKS)
    engine.close()
    assert_same_frames(frames, reference)


def test_three_ranks_run_four_steps_back_to_back_with_the_stream_engines_frames(base, audio, reference):
    stack = ProfileStack.from_settings(pipeline_settings(base, 3))
    engine = PipelineEngine(stack, seed=0)
    try:
        frames, ahead = run(engine, audio, BLOCKS)
        ranks = engine.host.stats()
        engine.close()
        assert_same_frames(frames, reference)
        assert ahead == 3, "blocks k+1 to k+3 should be in the pipeline (depth = ranks + 1) while block k finishes"
        assert [r["steps"] for r in ranks] == [[0, 3], [1], [2]]
        assert [r["decodes"] for r in ranks] == [False, False, True]
        # each rank allocates KV rings only for its own steps: rank 0 holds two, ranks 1 and 2 one each
        one_step = ranks[1]["cache_bytes"]
        assert ranks[2]["cache_bytes"] == one_step and one_step < ranks[0]["cache_bytes"] < 2 * one_step
    finally:
        engine.host.shutdown()


def test_killed_rank_ends_the_stream_with_an_error_naming_it_and_a_new_pipeline_starts(
        base, audio, reference):
    stack = ProfileStack.from_settings(pipeline_settings(base, 2, decode_on="own"))
    engine = PipelineEngine(stack, seed=0)
    frames, _ = run(engine, audio, BLOCKS)
    engine.close()
    assert_same_frames(frames, reference)

    host = engine.host
    engine = PipelineEngine(stack, seed=0)
    engine.start()
    engine.push_audio(audio)
    while not engine.generate_block():
        pass
    os.kill(host.processes[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(PipelineRankError, match="pipeline rank 1 .*SIGKILL") as info:
        while time.monotonic() - t0 < 2 * FAIL_WITHIN_S:
            engine.generate_block()
    assert info.value.rank == 1
    assert time.monotonic() - t0 < FAIL_WITHIN_S
    engine.close()
    assert not any(p.is_alive() for p in host.processes.values())

    # The process that hosts rank 0 (the server) goes on: the next session starts a fresh pipeline ...
    assert pipeline_host(stack) is not host
    engine = PipelineEngine(stack, seed=0)
    frames, _ = run(engine, audio, 2)
    engine.close()
    assert_same_frames(frames, reference[:len(frames)])
    # ... also when a rank died while no session was running.
    idle = engine.host
    os.kill(idle.processes[1].pid, signal.SIGKILL)
    idle.processes[1].join(FAIL_WITHIN_S)
    fresh = pipeline_host(stack)
    try:
        assert fresh is not idle and idle.failed is not None and fresh.healthy()
    finally:
        fresh.shutdown()


def test_pipeline_bench_reports_fps_first_frame_and_memory_per_rank(base):
    result = run_pipeline_bench(pipeline_settings(base, 2), world_size=2, blocks=3, warmup=1)
    assert result["fps"] > 0 and 0 < result["ttff_s"] < 60
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(r["peak_memory_bytes"] > 0 for r in result["ranks"])
