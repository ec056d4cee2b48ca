"""FrameRing: bounded, ordered, thread-safe, and fixed in memory."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from live.stream.frame_ring import FrameRing, RingClosed

H, W = 4, 6
JOIN_S = 10.0  # generous bound so a broken ring fails the test instead of hanging it


def _frames(start: int, n: int) -> torch.Tensor:
    """Frames whose first two bytes encode their sequence number."""
    out = torch.zeros((n, H, W, 3), dtype=torch.uint8)
    for i in range(n):
        out[i, 0, 0, 0], out[i, 0, 0, 1] = (start + i) % 256, (start + i) // 256
    return out


def _seq(frame: torch.Tensor) -> int:
    return int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1])


def _start(target, *args) -> tuple[threading.Thread, list]:
    errors: list = []

    def run():
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test through `errors`
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _wait_until(predicate) -> None:
    """Poll (bounded) until ``predicate()`` holds; the bound only turns a hang into a failure."""
    deadline = time.monotonic() + JOIN_S
    while not predicate():
        assert time.monotonic() < deadline, "condition never reached"
        time.sleep(0.001)


def test_fast_producer_and_slow_consumer_exchange_every_frame_in_order_without_exceeding_capacity():
    ring = FrameRing(capacity=5, height=H, width=W)
    total, chunk = 503, 12
    occupancy: list[int] = []

    def produce():
        for start in range(0, total, chunk):
            ring.put(_frames(start, min(chunk, total - start)))

    producer, errors = _start(produce)
    received = []
    for i in range(total):
        if i % 10 == 0:
            time.sleep(0.001)  # let the producer run ahead and fill the ring
        occupancy.append(len(ring))
        frame = ring.get(timeout=JOIN_S)
        assert frame is not None
        received.append(_seq(frame))
    producer.join(JOIN_S)

    assert not errors and not producer.is_alive()
    assert received == list(range(total)), "order must survive wraparound"
    assert max(occupancy) <= ring.capacity
    assert ring.frames_written == ring.frames_read == total
    assert len(ring) == 0


def test_producer_blocks_while_full_and_resumes_frame_by_frame():
    ring = FrameRing(capacity=3, height=H, width=W)
    producer, errors = _start(ring.put, _frames(0, 7))
    _wait_until(lambda: ring.frames_written == 3)
    producer.join(0.2)
    assert producer.is_alive(), "put must wait while the ring is full"
    assert len(ring) == 3

    assert _seq(ring.get()) == 0
    _wait_until(lambda: ring.frames_written == 4)
    assert len(ring) == 3

    received = [_seq(ring.get(timeout=JOIN_S)) for _ in range(6)]
    producer.join(JOIN_S)
    assert not errors and not producer.is_alive()
    assert received == [1, 2, 3, 4, 5, 6]


def test_close_wakes_a_blocked_producer_with_ring_closed():
    ring = FrameRing(capacity=2, height=H, width=W)
    producer, errors = _start(ring.put, _frames(0, 5))
    _wait_until(lambda: ring.frames_written == 2)
    ring.close()
    producer.join(JOIN_S)
    assert not producer.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RingClosed)
    with pytest.raises(RingClosed):
        ring.put(_frames(0, 1))


def test_close_wakes_a_blocked_consumer_after_queued_frames_are_drained():
    ring = FrameRing(capacity=2, height=H, width=W)
    ring.put(_frames(0, 1))
    assert _seq(ring.get()) == 0
    consumer, errors = _start(ring.get)
    consumer.join(0.2)
    assert consumer.is_alive(), "get must wait while the ring is empty"
    ring.close()
    consumer.join(JOIN_S)
    assert not consumer.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RingClosed)


def test_frames_queued_before_close_can_still_be_read():
    ring = FrameRing(capacity=4, height=H, width=W)
    ring.put(_frames(0, 2))
    ring.close()
    assert [_seq(ring.get()), _seq(ring.get_nowait())] == [0, 1]
    with pytest.raises(RingClosed):
        ring.get_nowait()


def test_timeouts_return_none_on_get_and_raise_on_put():
    ring = FrameRing(capacity=1, height=H, width=W)
    assert ring.get(timeout=0.01) is None
    assert ring.get_nowait() is None
    ring.put(_frames(0, 1))
    with pytest.raises(TimeoutError, match="0 of 1"):
        ring.put(_frames(1, 1), timeout=0.01)
    assert ring.frames_written == 1


def test_clear_drops_queued_frames_and_unblocks_the_producer():
    ring = FrameRing(capacity=3, height=H, width=W)
    producer, errors = _start(ring.put, _frames(0, 5))
    _wait_until(lambda: ring.frames_written == 3)
    assert ring.clear() == 3
    producer.join(JOIN_S)
    assert not errors and not producer.is_alive()
    assert [_seq(ring.get()), _seq(ring.get())] == [3, 4]
    assert ring.frames_dropped == 3


def test_storage_is_allocated_once_and_reused_across_thousands_of_frames():
    ring = FrameRing(capacity=7, height=H, width=W)
    storage, pointer = ring.storage, ring.storage.data_ptr()
    seq = 0
    for n in [1, 3, 7, 2] * 300:
        ring.put(_frames(seq, n))
        for _ in range(n):
            assert _seq(ring.get_nowait()) == seq
            seq += 1
    assert seq > 3000
    assert ring.storage is storage and ring.storage.data_ptr() == pointer
    assert ring.storage.shape == (7, H, W, 3)


def test_get_returns_an_independent_cpu_copy():
    ring = FrameRing(capacity=1, height=H, width=W)
    ring.put(_frames(5, 1))
    frame = ring.get()
    ring.put(_frames(9, 1))
    assert frame.device.type == "cpu" and frame.dtype == torch.uint8 and frame.shape == (H, W, 3)
    assert _seq(frame) == 5


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        (torch.zeros((1, H, W, 3), dtype=torch.float32), ValueError, "uint8"),
        (torch.zeros((H, W, 3), dtype=torch.uint8), ValueError, r"\[n, 4, 6, 3\]"),
        (torch.zeros((1, H, W + 1, 3), dtype=torch.uint8), ValueError, r"\[n, 4, 6, 3\]"),
        ([[0]], TypeError, "torch.Tensor"),
    ],
)
def test_put_rejects_wrong_type_dtype_or_shape_with_a_clear_error(frames, error, match):
    ring = FrameRing(capacity=2, height=H, width=W)
    with pytest.raises(error, match=match):
        ring.put(frames)
    assert len(ring) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ring_on_cuda_accepts_gpu_frames_and_returns_cpu_frames():
    ring = FrameRing(capacity=2, height=H, width=W, device="cuda")
    ring.put(_frames(0, 3).cuda()[:2])
    assert ring.storage.device.type == "cuda"
    assert _seq(ring.get()) == 0 and ring.get().device.type == "cpu"


def test_put_copies_and_waits_for_the_copy_without_holding_the_lock():
    """The consumer (the event loop) reads the ring's size while a put is still copying its frames in: the lock
    is never held across the copy (on a GPU, across the wait for it)."""
    ring = FrameRing(8, H, W)
    copying, release = threading.Event(), threading.Event()
    copy_in = ring._copy_in

    def slow_copy(frames: torch.Tensor, start: int) -> None:
        copying.set()
        release.wait(JOIN_S)
        copy_in(frames, start)

    ring._copy_in = slow_copy
    producer, errors = _start(ring.put, _frames(0, 3))
    assert copying.wait(JOIN_S)
    reader, read_errors = _start(lambda: (len(ring), ring.get_nowait()))
    reader.join(JOIN_S)
    assert not reader.is_alive(), "len()/get_nowait() waited for the producer's copy"
    assert len(ring) == 0  # reserved slots are not readable before the copy is done
    release.set()
    producer.join(JOIN_S)
    assert not errors and not read_errors
    assert [_seq(ring.get_nowait()) for _ in range(3)] == [0, 1, 2]
