"""``realtime: auto``: the largest size that sustains real time, measured once and cached."""

from __future__ import annotations

import pytest

from live.engine.calibration import CalibrationCache, cache_key, calibrate, choose_size, needed_fps
from live.engine.stream import ProfileStack
from live.engine.worker import EngineWorker
from live.metrics import ServerMetrics


def _auto(settings, sizes, tmp_path, margin=0.1):
    video = settings.video.model_copy(update={"realtime": "auto", "realtime_sizes": sizes, "realtime_margin": margin,
                                              "calibration_cache": tmp_path / "calibration.json"})
    return settings.model_copy(update={"video": video})


def test_the_largest_size_that_sustains_fps_with_margin_for_every_session_wins(tiny_settings, tmp_path):
    s = _auto(tiny_settings, ["720*400", "640*360", "384*256"], tmp_path)
    times = {"720*400": 0.60, "640*360": 0.40, "384*256": 0.20}
    asked: list[str] = []

    def block_s(size: str) -> float:
        asked.append(size)
        return times[size]

    assert needed_fps(s, 1) == pytest.approx(27.5)
    assert choose_size(block_s, s, 12, sessions=1) == ("640*360", {"720*400": 0.60, "640*360": 0.40}, True)
    assert asked == ["720*400", "640*360"]  # smaller sizes are not measured once one sustains
    assert choose_size(block_s, s, 12, sessions=2)[0] == "384*256"  # 2 × 27.5 fps needs 0.218 s per block
    size, _, sustains = choose_size(block_s, s, 12, sessions=3)
    assert (size, sustains) == ("384*256", False)  # none sustains: the smallest, reported as such


def test_calibration_measures_once_then_reads_the_cache(tiny_stack, tiny_settings, tmp_path):
    s = _auto(tiny_settings, ["64*64"], tmp_path, margin=0.0)
    tiny_stack.settings = s
    try:
        cache = CalibrationCache(tmp_path / "calibration.json")
        first = calibrate(tiny_stack, sessions=1, cache=cache)
        again = calibrate(tiny_stack, sessions=1, cache=cache)
    finally:
        tiny_stack.settings = tiny_settings
    assert first.source == "measured" and first.measured["64*64"] > 0
    assert again.source == "cache" and again.measured == first.measured and again.size_area == "64*64"


async def test_a_worker_generates_every_session_at_the_size_it_chose(tiny_settings, tmp_path):
    s = _auto(tiny_settings, ["128*128", "64*64"], tmp_path)
    worker = EngineWorker(s, ServerMetrics(), sessions=1)
    # Block times as if measured: 128×128 is too slow for real time here, 64×64 is fast enough.
    key = cache_key(ProfileStack.from_settings(s))
    CalibrationCache(s.video.calibration_cache).store(key, {"128*128": 5.0, "64*64": 0.01})
    worker.start()
    try:
        await worker.wait_ready()
        assert worker.realtime.size_area == "64*64" and worker.realtime.source == "cache"
        assert worker.realtime.measured == {"128*128": 5.0, "64*64": 0.01}
        handle = await worker.open(None, "", 0)
        assert (handle.engine.width, handle.engine.height) == (64, 64)
        handle.close()
    finally:
        worker.stop()


def test_attention_and_kv_storage_settings_key_the_calibration_cache(tiny_settings, tmp_path):
    s = _auto(tiny_settings, ["64*64"], tmp_path)
    keys = {cache_key(ProfileStack.from_settings(s.model_copy(update=u)))
            for u in ({}, {"kv_cache_dtype": "fp8"}, {"attention": "fp8"}, {"fp8_attention_skip_layers": [0]})}
    assert len(keys) == 4


def test_measuring_a_size_leaves_no_caches_pooled(tiny_settings):
    from live.engine.cache_pool import CachePool
    from live.engine.calibration import size_block_s

    stack = ProfileStack.from_settings(tiny_settings)
    pool = CachePool.shared(stack)
    pool.limit = 2
    assert size_block_s(stack, "64*64") > 0
    assert len(pool) == 0  # the next size's rings do not sit beside this one's
