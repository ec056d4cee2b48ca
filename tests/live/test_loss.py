"""Loss resilience: a talker whose network drops 10 % of the packets it receives (seeded, in its UDP layer, since
netem needs privileges CI lacks) still sees the avatar recover from every loss within the keyframe interval.

Run ``python -m tests.live.test_loss SERVER_URL SECONDS`` for the longer measurement in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import websockets
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from cli.client import new_peer
from cli.file_track import FileMicTrack
from live.settings import OutputSettings
from tests.conftest import ARTIFACTS, make_speechlike

LOSS = 0.10
SEED = 7
WATCH_S = 12.0
WARMUP_S = 1.0
RTP_FIRST_BYTES = range(128, 192)  # RTP and RTCP (RFC 7983); STUN and DTLS pass untouched


@dataclass
class LossResult:
    """What the lossy talker saw: frames decoded, the longest gap between two of them, what was dropped."""

    frames: int
    longest_freeze_s: float
    freezes_over_200ms: int
    dropped: int
    received: int
    keyframes: int

    def as_dict(self) -> dict:
        """JSON form for artifacts and RESULTS."""
        return {"frames": self.frames, "longest_freeze_s": round(self.longest_freeze_s, 3),
                "freezes_over_200ms": self.freezes_over_200ms, "packets_dropped": self.dropped,
                "packets_received": self.received, "keyframes_sent": self.keyframes}


class LossyLink:
    """Drops a seeded fraction of the RTP/RTCP datagrams an aiortc peer's ICE connection receives."""

    def __init__(self, loss: float, seed: int) -> None:
        self.loss = loss
        self.rng = random.Random(seed)
        self.dropped = 0
        self.received = 0

    def install(self, pc) -> None:
        """Wrap the ICE connection's delivery (aioice's ``Connection.data_received``, which its UDP protocols
        call); aiortc bundles every track on one transport."""
        connection = pc.getTransceivers()[0].receiver.transport.transport._connection
        deliver = connection.data_received

        def lossy(data: bytes, component: int) -> None:
            if data and data[0] in RTP_FIRST_BYTES:
                self.received += 1
                if self.rng.random() < self.loss:
                    self.dropped += 1
                    return
            deliver(data, component)

        connection.data_received = lossy


async def measure(server_url: str, seconds: float, loss: float = LOSS, seed: int = SEED) -> LossResult:
    """Talk to ``server_url`` for ``seconds`` with ``loss`` of the incoming packets dropped; time every decoded frame."""
    pc = new_peer()
    pc.addTransceiver(FileMicTrack(make_speechlike(seconds + 5)), direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    link = LossyLink(loss, seed)
    arrivals: list[float] = []
    connected = asyncio.Event()
    pc.on("connectionstatechange", lambda: pc.connectionState == "connected" and connected.set())

    async def watch(track) -> None:
        try:
            while True:
                await track.recv()
                arrivals.append(time.monotonic())
        except MediaStreamError:
            pass

    tasks: list[asyncio.Task] = []
    pc.on("track", lambda track: track.kind == "video" and tasks.append(asyncio.ensure_future(watch(track))))
    stats: list[dict] = []
    async with websockets.connect(server_url.replace("http://", "ws://") + "/ws") as ws:
        try:
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
            while (answer := json.loads(await ws.recv()))["type"] != "answer":
                assert answer["type"] != "error", answer
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            await asyncio.wait_for(connected.wait(), 30)
            link.install(pc)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if msg["type"] == "stats":
                    stats.append(msg)
            await ws.send(json.dumps({"type": "bye"}))
        finally:
            for task in tasks:
                task.cancel()
            await pc.close()
    times = np.asarray([t for t in arrivals if t >= arrivals[0] + WARMUP_S]) if arrivals else np.zeros(0)
    gaps = np.diff(times) if times.size > 1 else np.zeros(1)
    keyframes = stats[-1]["encoder"]["keyframes"] - stats[0]["encoder"]["keyframes"] if stats else 0
    return LossResult(len(arrivals), float(gaps.max()), int((gaps > 0.2).sum()), link.dropped, link.received,
                      keyframes)


async def test_video_recovers_from_10_percent_loss_within_the_keyframe_interval(server_url):
    result = await measure(server_url, WATCH_S)
    summary = result.as_dict()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "loss.json").write_text(json.dumps({"loss": LOSS, "seconds": WATCH_S, **summary}, indent=2))
    assert result.dropped > 0.05 * result.received, summary
    assert result.frames > 0.6 * 25 * WATCH_S, summary
    assert result.longest_freeze_s < OutputSettings().keyframe_interval_s, summary


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(sys.argv[1], float(sys.argv[2]))).as_dict(), indent=2))
