"""Health, metrics, pages and samples of a running server."""

from __future__ import annotations

import json

import aiohttp
import pytest
import websockets

from cli.client import new_peer
from tests.server_helpers import get_json, get_text, wait_until


async def test_health_reports_model_workers_and_sessions(server_url):
    health = await get_json(server_url + "/health")
    assert health["status"] == "ok"
    assert health["config"] == "tiny"
    assert health["model"]["fps"] == 25
    assert health["workers"] and all(w["ready"] for w in health["workers"])
    assert isinstance(health["sessions"], list)


async def test_metrics_expose_prometheus_series(server_url):
    text = await get_text(server_url + "/metrics")
    for name in ("live_avatar_sessions ", "live_avatar_frames_generated_total", "live_avatar_frames_sent_total",
                 "live_avatar_frames_repeated_total", "live_avatar_block_seconds_bucket",
                 "live_avatar_sessions_rejected_total", "live_avatar_engines{"):
        assert name in text, name
    for family in ("live_avatar_ring_occupancy_frames", "live_avatar_mouth_to_photon_seconds",
                   "live_avatar_generated_fps", "live_avatar_sent_fps"):
        assert f"# TYPE {family} gauge" in text, family


async def test_event_loop_lag_is_measured_and_reported(server_url):
    async def sampled() -> bool:
        text = await get_text(server_url + "/metrics")
        count = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("live_avatar_event_loop_lag_seconds_count"))
        return count > 0 and "live_avatar_event_loop_lag_p99_seconds " in text

    await wait_until(sampled, 10, "event-loop lag samples")
    health = await get_json(server_url + "/health")
    assert health["event_loop_lag_p99_ms"] >= 0


@pytest.mark.parametrize(("path", "marker"), [
    ("/", 'id="start"'),
    ("/view/any-session", 'class="viewer"'),
    ("/static/talk.js", "RTCPeerConnection"),
    ("/static/view.js", "/whep/"),
    ("/static/style.css", "--accent"),
])
async def test_pages_are_served(server_url, path, marker):
    assert marker in await get_text(server_url + path)


async def test_samples_are_listed_and_served(server_url):
    samples = await get_json(server_url + "/api/samples")
    assert samples, "no built-in sample images"
    async with aiohttp.ClientSession() as http:
        async with http.get(server_url + samples[0]["url"]) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
        async with http.get(server_url + "/samples/nope.png") as resp:
            assert resp.status == 404 and (await resp.json())["type"] == "error"


async def test_prompt_changes_mid_session_and_bye_ends_it(server_url):
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    samples = await get_json(server_url + "/api/samples")
    try:
        async with websockets.connect(server_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp,
                                      "image": samples[0]["name"], "prompt": "calm"}))
            answer = await _next(ws, "answer")
            session_id = answer["session_id"]
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
            assert "already has a session" in (await _next(ws, "error"))["message"]
            await ws.send(json.dumps({"type": "prompt", "prompt": "smiling warmly"}))
            assert (await _next(ws, "prompt"))["prompt"] == "smiling warmly"
            stats = await _next(ws, "stats")
            assert stats["id"] == session_id and stats["prompt"] == "smiling warmly"
            assert stats["image"] == samples[0]["name"]
            await ws.send(json.dumps({"type": "bye"}))
            ended = await _next(ws, "ended")
            assert ended["reason"] == "bye"
    finally:
        await pc.close()

    async def gone() -> bool:
        return session_id not in [s["id"] for s in (await get_json(server_url + "/health"))["sessions"]]

    await wait_until(gone, 10, "the session to end")


async def _next(ws, kind: str) -> dict:
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == kind:
            return msg
