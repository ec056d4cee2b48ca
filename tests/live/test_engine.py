"""The streaming engine: causality, determinism, bounded memory, size rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from live.engine.stream import StreamEngine
from live.images import generation_size
from tests.conftest import make_speechlike


def run_blocks(stack, audio: np.ndarray, blocks: int, seed: int = 0) -> list[torch.Tensor]:
    """Push ``audio`` in uneven chunks and collect the frames of the first ``blocks`` blocks."""
    eng = StreamEngine(stack, seed=seed)
    eng.start()
    frames: list[torch.Tensor] = []
    pos, chunk = 0, 1234
    while len(frames) < blocks * eng.frames_per_block - eng.drop_first:
        if eng.block_ready():
            eng.generate_block()
            while (f := eng.ring.get_nowait()) is not None:
                frames.append(f)
        elif pos < audio.size:
            eng.push_audio(audio[pos:pos + chunk])
            pos += chunk
        else:
            break
    eng.close()
    return frames


def test_future_audio_never_changes_emitted_frames(tiny_stack):
    prefix = make_speechlike(2.0, seed=1)
    a = np.concatenate([prefix, make_speechlike(1.5, seed=2)])
    b = np.concatenate([prefix, np.zeros(24000, np.float32)])
    eng = StreamEngine(tiny_stack)
    per_block = eng.samples_per_block
    # blocks whose audio + lookahead lie entirely inside the shared prefix
    shared_blocks = (prefix.size - eng.lookahead_samples) // per_block
    assert shared_blocks >= 3
    fa = run_blocks(tiny_stack, a, shared_blocks + 2)
    fb = run_blocks(tiny_stack, b, shared_blocks + 2)
    n_shared = shared_blocks * eng.frames_per_block
    for i in range(n_shared):
        assert torch.equal(fa[i], fb[i]), f"frame {i} changed when later audio changed"
    later = range(n_shared + eng.frames_per_block, len(fa))
    assert any(not torch.equal(fa[i], fb[i]) for i in later), "different audio must change later frames"


def test_same_seed_same_frames_and_other_seed_differs(tiny_stack):
    audio = make_speechlike(1.5, seed=3)
    f1 = run_blocks(tiny_stack, audio, 2, seed=7)
    f2 = run_blocks(tiny_stack, audio, 2, seed=7)
    f3 = run_blocks(tiny_stack, audio, 2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(f1, f2, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(f1, f3, strict=True))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_memory_flat_and_ring_bounded_over_200_blocks(tiny_stack):
    eng = StreamEngine(tiny_stack)
    eng.start()
    ring_storage = eng.ring.storage
    cache_ptr = eng.caches.k.data_ptr()
    chunk = make_speechlike(0.48, seed=4)
    rss = []
    for block in range(200):
        eng.push_audio(chunk)
        while eng.block_ready():
            eng.generate_block()
            assert len(eng.ring) <= eng.ring.capacity
            while eng.ring.get_nowait() is not None:
                pass
        if block in (30, 199):
            rss.append(_rss_bytes())
    assert eng.blocks_done >= 195
    assert eng.ring.storage is ring_storage and eng.caches.k.data_ptr() == cache_ptr
    assert eng.window.buffer_capacity <= 4 * eng.window.window_samples
    growth = rss[1] - rss[0]
    assert growth < 20 * 2**20, f"host memory grew by {growth / 2**20:.1f} MiB between block 30 and 199"
    eng.close()


def test_ring_blocks_producer_when_full(tiny_stack):
    """A block is only produced when the ring has room: a full ring makes generate_block wait."""
    import threading

    eng = StreamEngine(tiny_stack)
    eng.start()
    eng.push_audio(make_speechlike(6.0, seed=5))
    done = threading.Event()

    def producer() -> None:
        while eng.block_ready():
            try:
                eng.generate_block()
            except Exception:  # noqa: BLE001 - RingClosed at the end
                break
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    seen = 0
    while not done.is_set() or len(eng.ring):
        assert len(eng.ring) <= eng.ring.capacity
        if eng.ring.get(timeout=0.5) is not None:
            seen += 1
            if seen % 10 == 0:
                done.wait(0.05)  # slow consumer
    t.join()
    assert seen == eng.frames_emitted
    eng.close()


@pytest.mark.parametrize("area,image_hw,expected", [
    ("720*400", (400, 720), (384, 704)),
    ("720*400", (1080, 1920), (384, 704)),
    ("720*400", (1920, 1080), (704, 384)),
    ("720*400", (1024, 1024), (512, 512)),
    ("704*384", (400, 720), (384, 704)),
    ("688*368", (400, 720), (384, 640)),
    ("384*256", (400, 720), (256, 384)),
])
def test_generation_size_follows_upstream_area_rule(area, image_hw, expected):
    assert generation_size(image_hw, area) == expected
