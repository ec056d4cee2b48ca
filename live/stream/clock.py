"""The session clock: one media timeline per session that every output track is stamped and paced from."""

from __future__ import annotations

import asyncio
import time


class SessionClock:
    """Seconds of media time since the session's origin, on the monotonic clock.

    Video frame ``n`` and the audio of media time ``n / fps`` are both released at clock time ``n / fps`` and
    carry timestamps derived from that same media time, so RTCP sender reports of the two tracks agree and a
    viewer hears each syllable when the lips form it.
    """

    def __init__(self, origin: float | None = None) -> None:
        """Start the clock now, or at ``origin`` (a ``time.monotonic()`` value)."""
        self.origin = time.monotonic() if origin is None else origin

    def now(self) -> float:
        """Media time in seconds."""
        return time.monotonic() - self.origin

    async def sleep_until(self, t: float) -> None:
        """Sleep until media time ``t`` (returns at once if it has passed)."""
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
