"""A bounded ring of decoded video frames between the engine (producer) and the output tracks (consumer)."""

from __future__ import annotations

import threading
import time

import torch


class RingClosed(RuntimeError):
    """The frame ring was closed: no more frames will be accepted, and none remain to be read."""


class FrameRing:
    """Fixed-capacity FIFO of uint8 RGB frames, preallocated once as ``[capacity, H, W, 3]`` on ``device``.

    Thread-safe, for one producer and any consumers. ``put`` waits while the ring is full (back-pressure on the
    engine); ``get`` hands out CPU copies so a slot can be reused at once. Memory is O(capacity) for the life of a
    session; only counters grow. After ``close()`` puts fail, while gets still drain queued frames and then raise
    ``RingClosed``.

    The lock is never held while waiting on a GPU: ``put`` reserves free slots under the lock, copies into them
    and waits for the copy outside it, then publishes them; a CUDA ring's ``get`` copies one frame to the host on
    a stream of its own, so the consumer (the event loop) waits for that copy only, never for the model's queued
    kernels.
    """

    def __init__(self, capacity: int, height: int, width: int, device: torch.device | str = "cpu") -> None:
        """Allocate storage for ``capacity`` frames of ``height`` × ``width`` × 3 on ``device``."""
        if capacity < 1 or height < 1 or width < 1:
            raise ValueError(f"capacity, height and width must be >= 1, got {capacity}, {height}, {width}")
        self._storage = torch.zeros((capacity, height, width, 3), dtype=torch.uint8, device=device)
        self._capacity = capacity
        self._head = 0  # slot of the oldest queued frame
        self._size = 0
        self._reserved = 0  # slots after the queued frames that a put is copying into (not yet readable)
        cuda = self._storage.is_cuda
        self._read_stream = torch.cuda.Stream(self._storage.device) if cuda else None
        self._host = torch.empty((height, width, 3), dtype=torch.uint8, pin_memory=cuda)
        self._written = 0
        self._read = 0
        self._dropped = 0
        self._closed = False
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    @property
    def capacity(self) -> int:
        """Maximum number of queued frames."""
        return self._capacity

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, 3)`` of one frame."""
        return tuple(self._storage.shape[1:])

    @property
    def device(self) -> torch.device:
        """Device the ring's storage lives on."""
        return self._storage.device

    @property
    def storage(self) -> torch.Tensor:
        """The preallocated backing tensor (for inspection; do not write to it)."""
        return self._storage

    @property
    def frames_written(self) -> int:
        """Frames accepted by ``put`` since creation."""
        with self._not_full:
            return self._written

    @property
    def frames_read(self) -> int:
        """Frames handed out by ``get`` / ``get_nowait`` since creation."""
        with self._not_full:
            return self._read

    @property
    def frames_dropped(self) -> int:
        """Queued frames discarded by ``clear()`` since creation."""
        with self._not_full:
            return self._dropped

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        with self._not_full:
            return self._closed

    def __len__(self) -> int:
        """Number of frames queued now."""
        with self._not_full:
            return self._size

    def put(self, frames: torch.Tensor, timeout: float | None = None) -> None:
        """Append ``frames`` (uint8 ``[n, H, W, 3]``, any device) in order, waiting for free slots as needed.

        Frames are copied as space frees, so a put larger than the free space (or the capacity) completes once the
        consumer catches up. Raises ``TimeoutError`` if ``timeout`` seconds pass first (the frames copied so far
        stay queued) and ``RingClosed`` if the ring is or becomes closed.
        """
        self._validate(frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < frames.shape[0]:
            with self._not_full:
                if self._closed:
                    raise RingClosed(f"frame ring is closed; it accepts no more frames ({done} of "
                                     f"{frames.shape[0]} were queued)")
                while self._free() == 0 and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"frame ring full for {timeout} s: {done} of {frames.shape[0]} frames queued; "
                            "the consumer is not reading"
                        )
                    self._not_full.wait(remaining)
                if self._closed:
                    raise RingClosed(f"frame ring closed after {done} of {frames.shape[0]} frames were queued")
                count = min(frames.shape[0] - done, self._free())
                start = (self._head + self._size) % self._capacity
                self._reserved = count
            self._copy_in(frames[done:done + count], start)
            if self._storage.is_cuda:  # readers copy on their own stream: the frames must be there first
                torch.cuda.current_stream(self._storage.device).synchronize()
            with self._not_full:
                self._reserved = 0
                if not self._closed:
                    self._size += count
                    self._written += count
                    self._not_empty.notify_all()
            done += count

    def get(self, timeout: float | None = None) -> torch.Tensor | None:
        """Remove and return the oldest frame as a CPU uint8 ``[H, W, 3]`` copy, waiting up to ``timeout`` seconds.

        Returns None on timeout; raises ``RingClosed`` once the ring is closed and empty.
        """
        with self._not_empty:
            if not self._not_empty.wait_for(lambda: self._size > 0 or self._closed, timeout):
                return None
            return self._take()

    def get_nowait(self) -> torch.Tensor | None:
        """Like ``get`` but never waits: None when no frame is queued."""
        with self._not_empty:
            return self._take()

    def clear(self) -> int:
        """Drop every queued frame (interruption) and wake waiting producers; returns how many were dropped."""
        with self._not_full:
            dropped = self._size
            self._dropped += dropped
            self._head = (self._head + self._size) % self._capacity
            self._size = 0
            self._not_full.notify_all()
            return dropped

    def close(self) -> None:
        """Refuse further puts and wake every waiter; queued frames can still be read."""
        with self._not_full:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    def _validate(self, frames: torch.Tensor) -> None:
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}; convert with model.vae.to_uint8_frames")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(
                f"frames must be [n, {', '.join(map(str, self.frame_shape))}], got {tuple(frames.shape)}"
            )

    def _free(self) -> int:
        return self._capacity - self._size - self._reserved

    def _copy_in(self, frames: torch.Tensor, start: int) -> None:
        """Copy ``frames`` into the reserved slots from ``start`` (at most two contiguous runs); lock not held."""
        count = frames.shape[0]
        first = min(count, self._capacity - start)
        self._storage[start : start + first].copy_(frames[:first])
        if count > first:
            self._storage[: count - first].copy_(frames[first:count])

    def _take(self) -> torch.Tensor | None:
        """Pop the oldest frame as a CPU copy; None if empty and open, ``RingClosed`` if empty and closed."""
        if self._size == 0:
            if self._closed:
                raise RingClosed("frame ring closed and drained")
            return None
        if self._read_stream is None:
            frame = self._storage[self._head].clone()
        else:
            with torch.cuda.stream(self._read_stream):
                self._host.copy_(self._storage[self._head], non_blocking=True)
                self._read_stream.synchronize()
            frame = self._host.clone()
        self._head = (self._head + 1) % self._capacity
        self._size -= 1
        self._read += 1
        self._not_full.notify_all()
        return frame
