"""Admission control and reaping: two sessions run at once, a third is refused, a vanished peer is reaped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import websockets

from cli.client import new_peer, talk
from tests.conftest import ARTIFACTS
from tests.server_helpers import get_json, get_text, metric, session_ids, wait_until

REPO = Path(__file__).resolve().parents[2]


async def _talker_offer() -> str:
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_two_sessions_run_at_once_and_a_third_is_refused(server_url, speech_wav):
    health = await get_json(server_url + "/health")
    assert health["max_sessions"] == 2
    talks = [asyncio.ensure_future(talk(server_url, speech_wav, seconds=14.0)) for _ in range(2)]
    try:
        async def two_running() -> bool:
            return len(await session_ids(server_url)) == 2

        await wait_until(two_running, 120, "two sessions to run")
        offer = await _talker_offer()
        ws_url = server_url.replace("http://", "ws://") + "/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": offer}))
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert refusal["type"] == "error" and "full" in refusal["message"], refusal
        async with aiohttp.ClientSession() as http:
            async with http.post(server_url + "/whip", data=offer,
                                 headers={"Content-Type": "application/sdp"}) as resp:
                body = await resp.json()
                assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
                assert "full" in body["message"]
        results = await asyncio.gather(*talks)
    finally:
        for t in talks:
            t.cancel()
    assert results[0].session_id != results[1].session_id
    for result in results:
        summary = result.report.summary()
        # Each got its video all along (two streams plus two receiving peers share the 2 test cores, so the bar is
        # lower than the single talker's 90 %) ...
        assert result.report.frames_ratio >= 0.75, summary
        # ... and frames generated from its own audio (content after the plain pre-roll).
        assert result.report.glass_to_glass_s, summary
        stats = [m for m in result.server_messages if m.get("type") == "stats"]
        assert stats[-1]["frames_generated"] > 0, stats[-1]
    assert metric(await get_text(server_url + "/metrics"), "live_avatar_sessions_rejected_total") >= 2


TALKER = ("import sys; from pathlib import Path; from cli.client import run_client; "
          "run_client(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), 120)")
PUBLISHER = ("import asyncio, sys; from pathlib import Path; from cli.client import WhipPublisher; "
             "from cli.media import read_audio_16k\n"
             "async def main():\n"
             "    await WhipPublisher(sys.argv[1], read_audio_16k(Path(sys.argv[2]))).start()\n"
             "    await asyncio.sleep(120)\n"
             "asyncio.run(main())")


# SIGSTOP freezes a talker without closing anything (no bye, no TCP FIN) — like a laptop lid shut mid-call;
# SIGKILL of a WHIP publisher leaves only its media to go quiet (WHIP has no signaling channel to drop).
@pytest.mark.parametrize(("code", "vanish"), [(TALKER, signal.SIGSTOP), (PUBLISHER, signal.SIGKILL)],
                         ids=["websocket-talker-frozen", "whip-publisher-killed"])
async def test_a_vanished_peer_is_reaped_within_10_seconds_and_its_engine_freed(server_url, speech_wav, code,
                                                                               vanish):
    before = await get_json(server_url + "/health")
    assert before["sessions"] == []
    reaped_before = metric(await get_text(server_url + "/metrics"), "live_avatar_sessions_reaped_total")
    proc = subprocess.Popen([sys.executable, "-c", code, server_url, str(speech_wav),
                             str(ARTIFACTS / "vanished.mp4")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def running() -> bool:
            health = await get_json(server_url + "/health")
            return any(s["input_started"] for s in health["sessions"])

        await wait_until(running, 120, "the subprocess peer's session to start")
        os.kill(proc.pid, vanish)

        async def reaped() -> bool:
            return await session_ids(server_url) == []

        took = await wait_until(reaped, 15, "the vanished session to be reaped")
        assert took <= 10.0
        health = await get_json(server_url + "/health")
        assert all(w["engines"] == 0 for w in health["workers"])
        metrics = await get_text(server_url + "/metrics")
        assert metric(metrics, "live_avatar_sessions") == 0
        assert metric(metrics, "live_avatar_sessions_reaped_total") == reaped_before + 1
    finally:
        proc.kill()
        proc.wait()
