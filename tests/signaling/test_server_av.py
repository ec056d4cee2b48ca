"""A real aiortc talker over loopback: it gets the avatar back complete, with its own voice, in sync."""

from __future__ import annotations

import asyncio
import json
import time

import av

from cli.client import new_peer, talk
from cli.recording import Recorder
from tests.conftest import ARTIFACTS
from tests.server_helpers import get_json

SECONDS = 8.0


async def test_talker_gets_avatar_video_and_its_voice_back_in_sync(server_url, speech_wav):
    out = ARTIFACTS / "received.mp4"
    result = await talk(server_url, speech_wav, seconds=SECONDS, out=out)
    report = result.report
    summary = report.summary()
    (ARTIFACTS / "av_sync.json").write_text(json.dumps(summary, indent=2))
    frame_s = 1 / report.fps

    assert report.frames_ratio >= 0.9, summary
    assert report.audio_seconds >= SECONDS - 1, summary
    # The sent speech was found in the returned audio track, and the frame that shows its first sample left the
    # server together with it (sender-clock times from RTCP sender reports, as a browser lip-syncs).
    assert report.audio_delay_s is not None, f"sent speech not found in the received audio: {summary}"
    assert report.av_offset_s is not None, summary
    assert abs(report.av_offset_s) <= frame_s, summary
    # The voice comes back delayed by the server's output delay plus the network, never earlier.
    stats = [m for m in result.server_messages if m.get("type") == "stats" and m.get("latency_s") is not None]
    assert stats, "the server never reported its output delay"
    assert report.audio_delay_s >= stats[-1]["latency_s"], summary

    with av.open(str(out)) as container:
        kinds = {s.type for s in container.streams}
        video = container.streams.video[0]
        assert kinds == {"video", "audio"}
        assert video.average_rate == 25
        assert (video.width, video.height) == report.size
    health = await get_json(server_url + "/health")
    assert result.session_id not in [s["id"] for s in health["sessions"]]


async def test_without_mic_audio_the_avatar_keeps_moving(server_url):
    """A talker whose microphone sends nothing: the server feeds silence and the avatar still moves (idle)."""
    import websockets
    from aiortc import RTCSessionDescription

    pc = new_peer()
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    recorder = Recorder(max_seconds=60)
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with websockets.connect(server_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
            answer = json.loads(await ws.recv())
            assert answer["type"] == "answer", answer
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            recorder.attach(pc)
            deadline = time.monotonic() + 60
            while sum(v.has_content and v.fresh for v in recorder.video) < 25 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            await ws.send(json.dumps({"type": "bye"}))
    finally:
        await recorder.stop()
        await pc.close()
    moving = [v for v in recorder.video if v.has_content and v.fresh]
    assert len(moving) >= 25, f"only {len(moving)} new generated frames arrived"
