"""KV caches of ended streams wait in the worker's pool for the next stream of the same shape."""

from __future__ import annotations

import torch

from live.engine.cache_pool import CachePool
from live.engine.stream import StreamEngine
from tests.conftest import make_speechlike
from tests.live.test_engine import run_blocks


def test_a_stream_on_reused_caches_makes_the_frames_a_fresh_stream_makes(tiny_stack):
    pool = CachePool.shared(tiny_stack)
    audio = make_speechlike(3.0, seed=4)
    fresh = run_blocks(tiny_stack, audio, blocks=5)  # limit 0: nothing kept
    assert len(pool) == 0
    pool.limit = 1
    try:
        run_blocks(tiny_stack, make_speechlike(3.0, seed=9), blocks=5)  # another stream's history in the rings
        assert len(pool) == 1
        kept = pool._idle[0][1]
        eng = StreamEngine(tiny_stack, seed=0)
        eng.start()
        assert eng.caches is kept and kept.frames_written == [0] * len(kept.frames_written)
        eng.close()
        reused = run_blocks(tiny_stack, audio, blocks=5)
    finally:
        pool.limit = 0
        pool.retain(lambda key: False)
    assert len(reused) == len(fresh)
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh))


def test_the_pool_keeps_at_most_its_limit_and_only_matching_shapes_are_taken():
    pool = CachePool(limit=2)
    a, b, c = object(), object(), object()
    for key, caches in ((1, a), (2, b), (1, c)):
        pool.give(key, caches)
    assert len(pool) == 2  # the oldest went
    assert pool.take(3) is None
    pool.retain(lambda key: key == 1)
    assert len(pool) == 1
