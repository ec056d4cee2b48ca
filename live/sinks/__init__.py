"""Consumers of a session's output: the shared encoders, WebRTC tracks, RTMP push and virtual camera.

Every sink follows one small protocol (:class:`Sink`): a session starts it on its output and stops it when it
ends, so adding a consumer never touches the engine and only registers the sink with the session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the package stays light to import: the RTMP worker process starts from it
    from live.stream.output import SessionOutput


class Sink(Protocol):
    """A consumer of one session's output (video frames and the delayed audio, on the session clock)."""

    async def run(self, output: SessionOutput) -> None:
        """Consume ``output`` until it closes (the session closes it when it ends)."""
