"""RTMP push against a real nginx-rtmp server, read back with PyAV: synced H.264 + AAC, and recovery by itself
when the server is killed and restarted mid-stream."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from live.metrics import ServerMetrics
from live.settings import OutputSettings
from live.sinks.encoder import SharedAudioEncoder, SharedVideoEncoder
from live.sinks.rtmp import RtmpPush, RtmpUrlError, check_url, redact
from tests.conftest import ARTIFACTS
from tests.output_helpers import FlashSource, beep_times, flash_times, read_stream
from tests.server_helpers import AUTH

pytestmark = pytest.mark.rtmp

FPS = 25
READ_S = 5.0


async def _until(check, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_rtmp_push_is_synced_h264_and_aac_and_recovers_from_a_server_restart(nginx_rtmp):
    source = FlashSource(FPS)
    video = SharedVideoEncoder(320, 176, FPS, OutputSettings(), ServerMetrics())
    audio = SharedAudioEncoder()
    tasks = [asyncio.ensure_future(c) for c in (source.run(), video.run(source), audio.run(source))]
    push = RtmpPush(nginx_rtmp.url("avatar"), video, audio, ["127.0.0.1"])
    push.start()
    try:
        await _until(lambda: push.connected, 15, "the push to go live")
        info, frames, pcm, rate, audio_start = await asyncio.to_thread(read_stream, nginx_rtmp.url("avatar"), READ_S)
        assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac"), info
        assert info["fps"] == FPS and info["size"] == (320, 176), info
        span = frames[-1][0] - frames[0][0]
        # Every frame of the span is there, 40 ms apart, and the audio covers the same time.
        assert span >= READ_S - 0.05 and len(frames) == round(span * FPS) + 1, (span, len(frames))
        assert np.allclose(np.diff([t for t, _ in frames]), 1 / FPS, atol=0.002)
        assert abs(audio_start + pcm.size / rate - frames[-1][0]) < 0.5
        flashes, beeps = flash_times(frames), beep_times(pcm, rate, audio_start)
        offsets = [min(beeps, key=lambda b: abs(b - f)) - f for f in flashes if beeps]
        assert len(offsets) >= 3, (flashes, beeps)
        assert max(abs(o) for o in offsets) <= 0.040, offsets

        nginx_rtmp.kill()
        await _until(lambda: not push.connected, 15, "the push to notice the server is gone")
        await asyncio.sleep(1.0)
        nginx_rtmp.start()
        recovery_s = await _until(lambda: push.connected, 30, "the push to reconnect by itself")
        info2, frames2, _, _, _ = await asyncio.to_thread(read_stream, nginx_rtmp.url("avatar"), 2.0)
        assert info2["video_codec"] == "h264" and len(frames2) >= 2 * FPS - 2
        assert push.status.reconnects >= 1
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "rtmp_sync.json").write_text(json.dumps({
            "av_offsets_s": [round(o, 4) for o in offsets], "recovery_s": round(recovery_s, 2),
            "frames": len(frames), "span_s": round(span, 3), "status": push.status.as_dict()}, indent=2))
    finally:
        await push.stop()
        source.close()
        for task in tasks:
            task.cancel()
    assert push.status.state == "stopped"


def test_rtmp_urls_are_checked_and_stream_keys_redacted():
    assert check_url(" rtmp://a.example/live/key ") == "rtmp://a.example/live/key"
    for bad in ("http://a/live/key", "rtmp:///live/key", "rtmp://host", "rtmp://host/"):
        with pytest.raises(RtmpUrlError):
            check_url(bad)
    assert redact("rtmp://user:pw@a.example:1935/live/secret") == "rtmp://a.example:1935/live/***"


async def test_a_running_session_pushes_to_rtmp_started_over_websocket_and_stopped_over_rest(server_url, nginx_rtmp):
    import aiohttp
    import websockets
    from aiortc import RTCSessionDescription

    from cli.client import new_peer

    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    api = None
    try:
        async with websockets.connect(server_url.replace("http://", "ws://") + "/ws") as ws, \
                aiohttp.ClientSession(headers=AUTH) as http:  # the operator's key: REST control and listing
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp, "rtmp": "http://nope/x"}))
            assert "rtmp://" in (await _next(ws, "error"))["message"]
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp,
                                      "rtmp": nginx_rtmp.url("session")}))
            answer = await _next(ws, "answer")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            api = f"{server_url}/api/sessions/{answer['session_id']}/rtmp"
            while (await _next(ws, "stats"))["rtmp"]["state"] != "live":
                pass
            info, frames, pcm, rate, _ = await asyncio.to_thread(read_stream, nginx_rtmp.url("session"), 3.0)
            assert (info["video_codec"], info["audio_codec"], info["fps"]) == ("h264", "aac", FPS), info
            assert list(info["size"]) == [answer["width"], answer["height"]]
            assert len(frames) >= 3 * FPS and pcm.size >= 2.5 * rate
            health = await _json(http, "GET", server_url + "/health")
            status = next(s for s in health["sessions"] if s["id"] == answer["session_id"])["rtmp"]
            assert status["state"] == "live" and status["url"].endswith("/live/***"), status
            assert (await _json(http, "POST", api, data=b"{}"))["message"].startswith("send JSON")
            assert (await _json(http, "DELETE", api)) == {"rtmp": None}
            assert (await _json(http, "GET", api)) == {"rtmp": None}
            assert (await _json(http, "DELETE", api))["type"] == "error"
            missing = f"{server_url}/api/sessions/nope/rtmp"
            assert "no session" in (await _json(http, "POST", missing, json={"url": nginx_rtmp.url("x")}))["message"]
            await ws.send(json.dumps({"type": "bye"}))
    finally:
        await pc.close()


async def _json(http, method: str, url: str, **kwargs) -> dict:
    async with http.request(method, url, **kwargs) as resp:
        return await resp.json()


async def _next(ws, kind: str) -> dict:
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == kind:
            return msg
