"""RTMP pushes cannot stall or probe the server: a tarpit (a TCP listener that accepts and never answers) changes
neither /health's latency nor the session's frame rate; a refused port reports the same error as any other
failure; concurrent starts leave no push running after a stop; hosts off the allow-list are refused."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import aiohttp
import websockets
from aiortc import RTCSessionDescription

from cli.client import new_peer
from live.sinks.rtmp import CONNECTION_FAILED
from tests.conftest import ARTIFACTS

WATCH_S = 3.0
HEALTH_BOUND_S = 2.0


class Tarpit:
    """Accepts TCP connections on a loopback port and never sends a byte; counts the ones still open."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self._conns.append(conn)

    def open_connections(self) -> int:
        """Connections whose peer has not closed them: what the peer sent is read and dropped until the read
        would block (open) or ends (closed, or reset)."""
        alive = 0
        for conn in self._conns:
            conn.setblocking(False)
            try:
                while conn.recv(65536):
                    pass
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for conn in (*self._conns, self.sock):
            conn.close()


async def _talker(server_url: str):
    """A talker session over /ws; returns (peer, websocket, answer message)."""
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    ws = await websockets.connect(server_url.replace("http://", "ws://") + "/ws")
    await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
    answer = await _next(ws, "answer")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    return pc, ws, answer


async def _next(ws, kind: str) -> dict:
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == kind:
            return msg
        if msg["type"] == "error":
            raise AssertionError(msg["message"])


async def _stats(ws) -> dict:
    return await _next(ws, "stats")


async def test_a_tarpit_stalls_neither_health_nor_frames_and_errors_are_uniform(server_url):
    tarpit = Tarpit()
    pc, ws, answer = await _talker(server_url)
    try:
        await _stats(ws)
        first = await _stats(ws)
        await ws.send(json.dumps({"type": "rtmp", "url": f"rtmp://127.0.0.1:{tarpit.port}/live/key"}))
        assert (await _next(ws, "rtmp"))["rtmp"]["state"] == "connecting"
        latencies = []
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            while time.monotonic() - started < WATCH_S:
                t0 = time.monotonic()
                async with http.get(server_url + "/health") as resp:
                    assert resp.status == 200
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)
        last = await _stats(ws)
        assert tarpit.accepted >= 1, "the push never reached the tarpit"
        assert last["rtmp"]["state"] == "connecting", last["rtmp"]
        fps = (last["frames_sent"] - first["frames_sent"]) / (last["age_s"] - first["age_s"])
        # Generous bounds: a stalled GIL shows as seconds, a loaded CI machine as tens of milliseconds.
        assert max(latencies) < HEALTH_BOUND_S, latencies
        assert fps > 0.5 * answer["fps"], (fps, first, last)

        # A refused port fails fast, with the same text as every other failure.
        with socket.create_server(("127.0.0.1", 0)) as closed:
            port = closed.getsockname()[1]
        await ws.send(json.dumps({"type": "rtmp", "url": f"rtmp://127.0.0.1:{port}/live/key"}))
        await _next(ws, "rtmp")
        assert tarpit.open_connections() == 0, "the tarpit's push was not ended when it was replaced"
        while (status := (await _stats(ws))["rtmp"])["state"] != "reconnecting":
            pass
        assert status["error"] == CONNECTION_FAILED

        # Hosts off the allow-list are refused before anything connects.
        await ws.send(json.dumps({"type": "rtmp", "url": "rtmp://10.0.0.1/live/key"}))
        assert "not allowed" in (await _next_error(ws))
        await ws.send(json.dumps({"type": "rtmp", "url": None}))
        assert (await _next(ws, "rtmp"))["rtmp"] is None
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "rtmp_tarpit.json").write_text(json.dumps({
            "health_latency_max_ms": round(max(latencies) * 1000, 1),
            "health_latency_median_ms": round(sorted(latencies)[len(latencies) // 2] * 1000, 1),
            "health_requests": len(latencies), "frames_per_s_during_tarpit": round(fps, 2)}, indent=2))
        await ws.send(json.dumps({"type": "bye"}))
    finally:
        await ws.close()
        await pc.close()
        tarpit.close()


async def _next_error(ws) -> str:
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "error":
            return msg["message"]


async def test_concurrent_starts_leave_no_push_behind_after_a_stop(server_url):
    tarpit = Tarpit()
    pc, ws, answer = await _talker(server_url)
    api = f"{server_url}/api/sessions/{answer['session_id']}/rtmp"
    token = answer.get("control_token")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"rtmp://127.0.0.1:{tarpit.port}/live/key"
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            async def start() -> int:
                async with http.post(api, json={"url": url}) as resp:
                    return resp.status

            assert await asyncio.gather(*(start() for _ in range(4))) == [201] * 4
            deadline = time.monotonic() + 10
            while not tarpit.open_connections() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert tarpit.open_connections() == 1, "one push, the last one started, should be connecting"
            async with http.delete(api) as resp:
                assert resp.status == 200
        deadline = time.monotonic() + 10
        while tarpit.open_connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert tarpit.open_connections() == 0, f"{tarpit.open_connections()} pushes still connected after DELETE"
        await ws.send(json.dumps({"type": "bye"}))
    finally:
        await ws.close()
        await pc.close()
        tarpit.close()
