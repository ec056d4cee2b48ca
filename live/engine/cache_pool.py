"""KV caches of ended streams, kept for the next stream of the same shape.

A stream's CUDA graphs are captured against its KV buffers, so a new stream with new buffers captures them again
(16 graphs of a 40-layer step at 14B) in the middle of its first blocks, where the capture stalls the output. A
worker keeps the caches of streams that ended (up to the number of sessions it serves) and hands them to new
streams of the same shape: the graphs stay valid and nothing is allocated. Outside a worker the pool keeps
nothing (limit 0), so benchmarks and renders measure fresh memory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable

from model.dit import StepCaches
from model.stack import ModelStack

_POOLS: "weakref.WeakKeyDictionary[ModelStack, CachePool]" = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


class CachePool:
    """Idle :class:`~model.dit.StepCaches` by shape key, at most ``limit`` of them (oldest dropped first)."""

    def __init__(self, limit: int = 0) -> None:
        """A pool that keeps at most ``limit`` caches."""
        self.limit = limit
        self._idle: list[tuple[Hashable, StepCaches]] = []
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, stack: ModelStack) -> "CachePool":
        """The stack's pool (created with limit 0 on first use)."""
        with _POOLS_LOCK:
            pool = _POOLS.get(stack)
            if pool is None:
                pool = _POOLS[stack] = cls()
            return pool

    def take(self, key: Hashable) -> StepCaches | None:
        """An idle cache of shape ``key``, reset for a new stream; None when there is none."""
        with self._lock:
            for i, (k, caches) in enumerate(self._idle):
                if k == key:
                    del self._idle[i]
                    caches.reset()
                    return caches
        return None

    def give(self, key: Hashable, caches: StepCaches) -> None:
        """Keep ``caches`` of an ended stream for the next stream of shape ``key`` (dropped when over the limit)."""
        with self._lock:
            self._idle.append((key, caches))
            del self._idle[: max(0, len(self._idle) - self.limit)]

    def retain(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop the idle caches whose key ``keep`` refuses."""
        with self._lock:
            self._idle = [(k, c) for k, c in self._idle if keep(k)]

    def __len__(self) -> int:
        """Idle caches held."""
        with self._lock:
            return len(self._idle)
