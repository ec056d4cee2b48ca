"""`live-avatar client` and the peers tests and benchmarks use: a talker over /ws, a WHIP publisher, a WHEP viewer.

Each is a real aiortc peer: the talker streams an audio file as its microphone in real time and records the avatar
video and audio it gets back (see :mod:`cli.recording` for the measurements). Unless given their own, they use the
STUN/TURN servers the server hands its pages (``GET /api/config``, the server's ``server.ice_servers``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from pydantic import ValidationError

from cli.file_track import FileMicTrack
from cli.media import MediaError, read_audio_16k
from cli.recording import Recorder, SyncReport
from live.peer import rtc_configuration
from live.settings import IceServer
from model.audio_features import SAMPLE_RATE

TAIL_S = 3.0
CONNECT_TIMEOUT_S = 30.0


class ClientError(RuntimeError):
    """The server refused or the connection failed; the message says why."""


@dataclass
class TalkResult:
    """Outcome of one talker session."""

    session_id: str
    report: SyncReport
    out: Path | None
    server_messages: list[dict]


def _ws_url(server: str) -> str:
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "/ws", "", ""))


def _http_url(server: str, path: str) -> str:
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urljoin(urlunsplit((scheme, parts.netloc, "/", "", "")), path)


def new_peer(ice_servers: Sequence[IceServer] = ()) -> RTCPeerConnection:
    """A peer connection using ``ice_servers`` (default none: loopback and LAN need no STUN/TURN)."""
    return RTCPeerConnection(rtc_configuration(ice_servers))


def parse_ice_server(text: str) -> IceServer:
    """A STUN/TURN server given as text: a URL (``stun:host:3478``) or a JSON object with ``urls`` and, for TURN,
    ``username`` and ``credential``; raises ``ValueError`` saying what is wrong."""
    try:
        return IceServer.model_validate(json.loads(text) if text.lstrip().startswith("{") else text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ICE server {text!r} is neither a STUN/TURN URL nor a JSON object: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"ICE server {text!r}: {problems}") from None


async def server_ice_servers(server: str) -> list[IceServer]:
    """The STUN/TURN servers ``server`` hands its pages (``GET /api/config``); raises :class:`ClientError`."""
    url = _http_url(server, "/api/config")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    raise ClientError(f"GET {url} answered {resp.status}: {await resp.text()}")
                body = await resp.json()
        return [IceServer.model_validate(s) for s in body["ice_servers"]]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ClientError(f"cannot read {url}: {exc.__class__.__name__}: {exc}") from exc
    except (KeyError, TypeError, ValidationError) as exc:
        raise ClientError(f"{url} is not a live-avatar client configuration: {exc}") from exc


async def _peer(server: str, ice_servers: Sequence[IceServer] | None) -> RTCPeerConnection:
    """A peer using ``ice_servers``, or the server's own when None."""
    return new_peer(await server_ice_servers(server) if ice_servers is None else ice_servers)


async def _connected(pc: RTCPeerConnection, timeout: float) -> float:
    """Wait for the ICE/DTLS connection; returns the wall time it came up."""
    done = asyncio.get_running_loop().create_future()

    def changed() -> None:
        if pc.connectionState == "connected" and not done.done():
            done.set_result(time.time())
        elif pc.connectionState in ("failed", "closed") and not done.done():
            done.set_exception(ClientError(f"peer connection {pc.connectionState}"))

    pc.on("connectionstatechange", changed)
    changed()
    return await asyncio.wait_for(done, timeout)


async def talk(server: str, audio: Path, seconds: float | None = None, out: Path | None = None,
               image: str | None = None, prompt: str = "",
               ice_servers: Sequence[IceServer] | None = None, messages: list[dict] | None = None) -> TalkResult:
    """Drive a session over /ws with ``audio`` as the microphone for ``seconds`` (default: the audio + a tail),
    record what comes back (to ``out`` if given) and measure it. ``ice_servers`` None: the server's. The server's
    messages are appended to ``messages`` as they arrive (the answer's tokens can be read while the session runs)."""
    pcm = read_audio_16k(Path(audio))
    duration = seconds if seconds is not None else pcm.shape[0] / SAMPLE_RATE + TAIL_S
    pc = await _peer(server, ice_servers)
    mic = FileMicTrack(pcm)
    pc.addTransceiver(mic, direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    recorder = Recorder(max_seconds=duration + 30, work_path=out)
    messages = [] if messages is None else messages
    try:
        async with websockets.connect(_ws_url(server), max_size=2**20, open_timeout=CONNECT_TIMEOUT_S) as ws:
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp, "image": image,
                                      "prompt": prompt}))
            answer = await _await_answer(ws, messages)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            recorder.attach(pc)
            listener = asyncio.ensure_future(_collect(ws, messages))
            started = await _connected(pc, CONNECT_TIMEOUT_S)
            ended = asyncio.ensure_future(_wait_ended(messages))
            await asyncio.wait([ended], timeout=duration)
            stopped = time.time()
            ended.cancel()
            await recorder.drain(stopped)
            if not any(m.get("type") == "ended" for m in messages):
                await ws.send(json.dumps({"type": "bye"}))
            listener.cancel()
    except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError) as exc:
        raise ClientError(f"cannot talk to {server}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        await recorder.stop()
        await pc.close()
    report = recorder.report(pcm, mic.spoken_at, float(answer["fps"]), started, stopped)
    saved = recorder.save(out) if out is not None else None
    return TalkResult(answer["session_id"], report, saved, messages)


async def _await_answer(ws, messages: list[dict]) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
        messages.append(msg)
        if msg.get("type") == "answer":
            return msg
        if msg.get("type") == "error":
            raise ClientError(f"server refused: {msg.get('message')}")


async def _collect(ws, messages: list[dict]) -> None:
    try:
        async for raw in ws:
            messages.append(json.loads(raw))
    except websockets.exceptions.ConnectionClosed:
        pass


async def _wait_ended(messages: list[dict]) -> None:
    while not any(m.get("type") == "ended" for m in messages):
        await asyncio.sleep(0.1)


async def _post_offer(pc: RTCPeerConnection, url: str, protocol: str,
                      token: str | None = None) -> tuple[str, RTCSessionDescription, dict[str, str]]:
    """POST our offer to a WHIP/WHEP endpoint (with ``Authorization: Bearer token`` if given); returns the resource's
    ``Location`` (which carries the token that may delete it), the answer to apply and the response headers.

    Raises :class:`ClientError` with the server's message if it does not answer ``201 Created``.
    """
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp", **({"Authorization": f"Bearer {token}"} if token else {})}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=pc.localDescription.sdp, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise ClientError(f"{protocol} refused ({resp.status}): {body}")
            return resp.headers["Location"], RTCSessionDescription(sdp=body, type="answer"), dict(resp.headers)


async def _hang_up(pc: RTCPeerConnection, resource_url: str) -> int:
    """DELETE a WHIP/WHEP resource, then close the peer; returns the HTTP status of the DELETE."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.delete(resource_url) as resp:
                return resp.status
    finally:
        await pc.close()


class WhipPublisher:
    """A WHIP client: sends an audio file as the voice of a new session (RFC 9725)."""

    def __init__(self, server: str, audio: np.ndarray, ice_servers: Sequence[IceServer] | None = None,
                 token: str | None = None) -> None:
        """Prepare to publish ``audio`` (16 kHz float32) to ``server``; ``ice_servers`` None: the server's;
        ``token``: the server's API key, sent as the WHIP bearer token."""
        self.server = server
        self.mic = FileMicTrack(audio)
        self.ice_servers = ice_servers
        self.token = token
        self.pc: RTCPeerConnection | None = None
        self.location: str | None = None
        self.view_token: str | None = None

    @property
    def session_id(self) -> str:
        """The session id from the resource URL."""
        if self.location is None:
            raise RuntimeError("not published")
        return urlsplit(self.location).path.rstrip("/").rsplit("/", 1)[-1]

    async def start(self, query: str = "") -> None:
        """POST the offer; raises :class:`ClientError` with the server's message if refused."""
        self.pc = await _peer(self.server, self.ice_servers)
        self.pc.addTransceiver(self.mic, direction="sendonly")
        self.location, answer, headers = await _post_offer(self.pc, _http_url(self.server, "/whip" + query), "WHIP",
                                                           self.token)
        self.view_token = headers.get("X-View-Token")
        await self.pc.setRemoteDescription(answer)
        await _connected(self.pc, CONNECT_TIMEOUT_S)

    async def stop(self) -> int:
        """DELETE the resource and close; returns the HTTP status of the DELETE."""
        return await _hang_up(self.pc, _http_url(self.server, self.location))


class WhepViewer:
    """A WHEP client: watches a session and records what it receives."""

    def __init__(self, server: str, session_id: str, max_seconds: float = 120.0,
                 ice_servers: Sequence[IceServer] | None = None, token: str | None = None, audio: bool = True) -> None:
        """Prepare to watch ``session_id`` on ``server`` with ``token`` (the session's view token, or the API key);
        ``ice_servers`` None: the server's; ``audio`` False: offer video only."""
        self.server = server
        self.audio = audio
        self.session_id = session_id
        self.token = token
        self.ice_servers = ice_servers
        self.pc: RTCPeerConnection | None = None
        self.recorder = Recorder(max_seconds=max_seconds)
        self.location: str | None = None
        self.connected_at: float | None = None

    async def start(self) -> None:
        """POST the offer and start receiving; raises :class:`ClientError` if refused."""
        self.pc = await _peer(self.server, self.ice_servers)
        self.pc.addTransceiver("video", direction="recvonly")
        if self.audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.location, answer, _ = await _post_offer(self.pc, _http_url(self.server, f"/whep/{self.session_id}"),
                                                     "WHEP", self.token)
        await self.pc.setRemoteDescription(answer)
        self.recorder.attach(self.pc)
        self.connected_at = await _connected(self.pc, CONNECT_TIMEOUT_S)

    async def stop(self, received_until: float | None = None) -> int:
        """Read what was sent up to ``received_until`` (wall time, if given), then DELETE the viewer resource and
        close; returns the HTTP status of the DELETE."""
        if received_until is not None:
            await self.recorder.drain(received_until)
        await self.recorder.stop()
        return await _hang_up(self.pc, _http_url(self.server, self.location))


def run_client(server: str, audio: Path, out: Path, seconds: float | None,
               ice_servers: Sequence[IceServer] | None = None) -> int:
    """`live-avatar client`: talk to ``server`` with ``audio`` as the mic, record to ``out``; returns an exit code.

    ``ice_servers`` None: the STUN/TURN servers the server hands out.
    """
    try:
        result = asyncio.run(talk(server, Path(audio), seconds, Path(out), ice_servers=ice_servers))
    except (ClientError, MediaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = result.report.summary()
    print(f"session {result.session_id}: wrote {result.out}")
    print(json.dumps(summary, indent=2))
    return 0
