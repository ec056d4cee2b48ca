"""How late the event loop runs: a task that sleeps a fixed period and records how much later it woke.

Every session's pacing, signaling and sockets share one loop, so a callback that blocks it (a GPU sync, a long
encode) shows here first. The samples feed a Prometheus histogram and a recent-window p99 for /metrics and
/health.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Histogram

PERIOD_S = 0.01
WINDOW_SAMPLES = 6000  # about the last minute at PERIOD_S (longer when the loop is late)


class LoopLagMonitor:
    """Measures the event loop's lag while :meth:`run` runs on it."""

    def __init__(self, histogram: Histogram, period_s: float = PERIOD_S) -> None:
        """Record each wake-up's lateness beyond ``period_s`` in ``histogram`` and a recent window."""
        self._histogram = histogram
        self._period = period_s
        self._recent: deque[float] = deque(maxlen=WINDOW_SAMPLES)

    async def run(self) -> None:
        """Sleep ``period_s`` at a time until cancelled, recording how late each wake-up was."""
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self._period)
            lag = max(0.0, time.perf_counter() - t0 - self._period)
            self._recent.append(lag)
            self._histogram.observe(lag)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the recent lags in seconds; 0 before the first sample."""
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
