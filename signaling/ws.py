"""WebSocket signaling at /ws: JSON messages for offer/answer, ICE candidates, prompt changes and goodbye.

Client → server::

    {"type": "offer", "sdp": "...", "image": "<sample name | upload id | null>", "prompt": "...",
     "rtmp": "<rtmp://host/app/key | null>", "key": "<API key, when server.auth.publish is 'key'>"}
    {"type": "candidate", "candidate": "candidate:...", "sdpMid": "0", "sdpMLineIndex": 0}
    {"type": "prompt", "prompt": "..."}          (mid-session; takes effect at the next block)
    {"type": "rtmp", "url": "rtmp://..." | null} (start / replace / stop the session's RTMP push)
    {"type": "bye"}

Server → client: ``answer`` (with ``session_id``, the session's ``view_token`` and ``control_token``, their
``expires_at`` and ``view_url``, the viewer link carrying the view token), ``stats`` (every second, with the RTMP
status), ``prompt`` (ack), ``rtmp`` (ack with the push status), ``ended`` (with ``reason``) and ``error`` (with
``message``). An error never closes the connection; messages larger than the protocol limit do (close code 1009),
and so do messages beyond the address's rate (1008, ``server.guard.ws_rate``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Literal, Protocol, Union

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from live.peer import MAX_SDP_BYTES, OfferError
from live.session import AdmissionError, EngineStartError, Session
from live.sinks.rtmp import MAX_URL_CHARS, RtmpUrlError, check_url
from live.sinks.tracks import check_h264_offer

from .guard import GUARD
from .http import parse_json
from .images import MAX_PROMPT_CHARS, resolve_options
from .rest import check_rtmp_url
from .sdp import answer, check_candidate, check_offer
from .state import STATE, ServerState

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 96 * 1024
PROTOCOL_MAX_MESSAGE_BYTES = 1024 * 1024
HEARTBEAT_S = 5.0
STATS_INTERVAL_S = 1.0


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OfferMessage(_Message):
    """Start a session: the browser's SDP offer plus session options."""

    type: Literal["offer"]
    sdp: str = Field(max_length=MAX_SDP_BYTES)
    image: str | None = Field(None, max_length=200)
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    rtmp: str | None = Field(None, max_length=MAX_URL_CHARS)
    key: str | None = Field(None, max_length=512)


class CandidateMessage(_Message):
    """A trickled ICE candidate of the client (null/empty candidate = end of candidates)."""

    type: Literal["candidate"]
    candidate: str | None = Field(None, max_length=2048)
    sdpMid: str | None = Field(None, max_length=64)
    sdpMLineIndex: int | None = Field(None, ge=0, le=1024)


class PromptMessage(_Message):
    """Change the prompt mid-session."""

    type: Literal["prompt"]
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)


class RtmpMessage(_Message):
    """Start (or replace) the session's RTMP push, or stop it with ``url: null``."""

    type: Literal["rtmp"]
    url: str | None = Field(None, max_length=MAX_URL_CHARS)


class ByeMessage(_Message):
    """End the session."""

    type: Literal["bye"]


ClientMessage = TypeAdapter(Annotated[Union[OfferMessage, CandidateMessage, PromptMessage, RtmpMessage, ByeMessage],
                                      Field(discriminator="type")])
MESSAGE_TYPES = ("offer", "candidate", "prompt", "rtmp", "bye")


def describe(exc: ValidationError) -> str:
    """One readable line for a message that does not validate."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or "message"
    return f"{where}: {first['msg']}"


def parse_message(text: str) -> tuple[dict, BaseModel]:
    """A client's text message as (its JSON object, its validated message); ``ValueError`` with what is wrong
    (size, JSON, nesting, type, fields) for the client."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(text)} bytes is larger than the {MAX_MESSAGE_BYTES}-byte limit")
    data = parse_json(text)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError('each message must be a JSON object with a "type" field')
    if data["type"] not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {data['type']!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    try:
        return data, ClientMessage.validate_python(data)
    except ValidationError as exc:
        raise ValueError(f"invalid {data['type']} message: {describe(exc)}") from None


class _Connection:
    """One signaling connection; it owns at most one session at a time."""

    def __init__(self, ws: web.WebSocketResponse, state: ServerState) -> None:
        self.ws = ws
        self.state = state
        self.session: Session | None = None
        self._tasks: set[asyncio.Task] = set()

    async def send(self, payload: dict) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_json(payload)
        except (ConnectionError, RuntimeError):
            pass

    async def error(self, message: str) -> None:
        await self.send({"type": "error", "message": message})

    async def handle(self, text: str) -> None:
        try:
            _, msg = parse_message(text)
        except ValueError as exc:
            await self.error(str(exc))
            return
        if isinstance(msg, OfferMessage):
            await self.offer(msg)
        elif isinstance(msg, CandidateMessage):
            await self.candidate(msg)
        elif isinstance(msg, PromptMessage):
            await self.prompt(msg)
        elif isinstance(msg, RtmpMessage):
            await self.rtmp(msg)
        else:
            await self.end("bye")

    async def offer(self, msg: OfferMessage) -> None:
        if self.session is not None:
            await self.error("this connection already has a session; send bye first or open a new connection")
            return
        try:
            self.state.auth.require_publisher(msg.key, how='send it as "key" in the offer message')
        except web.HTTPException as exc:
            await self.error(exc.text or exc.reason)
            return
        try:
            check_offer(msg.sdp, need=("audio", "video"))
            check_h264_offer(msg.sdp)  # before an engine starts for an offer we could not serve
            options = await resolve_options(self.state.images, msg.image, msg.prompt)
            rtmp_url = check_url(msg.rtmp, self.state.settings.output.rtmp_allowed_hosts) if msg.rtmp else None
        except (OfferError, RtmpUrlError, ValueError) as exc:
            await self.error(str(exc))
            return
        try:
            session = await self.state.manager.create("ws", options)
        except (AdmissionError, EngineStartError) as exc:
            await self.error(str(exc))
            return
        try:
            sdp_answer = await answer(session, session.connect_talker(msg.sdp))
        except OfferError as exc:
            await self.error(str(exc))
            return
        self.session = session
        await self.send({"type": "answer", "sdp": sdp_answer, "session_id": session.id,
                         **self.state.auth.tokens(session.id), **session.stream_info()})
        if rtmp_url is not None:
            await session.start_rtmp(rtmp_url)
        self._spawn(self._report(session))

    async def candidate(self, msg: CandidateMessage) -> None:
        if self.session is None or self.session.talker is None:
            await self.error("no session yet: send an offer before ICE candidates")
            return
        if not msg.candidate:
            return
        try:
            check_candidate(msg.candidate)
            await self.session.add_talker_candidate(msg.candidate, msg.sdpMid, msg.sdpMLineIndex)
        except OfferError as exc:
            await self.error(str(exc))

    async def prompt(self, msg: PromptMessage) -> None:
        if self.session is None:
            await self.error("no session yet: send an offer first")
            return
        self.session.set_prompt(msg.prompt)
        await self.send({"type": "prompt", "prompt": msg.prompt})

    async def rtmp(self, msg: RtmpMessage) -> None:
        if self.session is None:
            await self.error("no session yet: send an offer first")
            return
        if msg.url:
            try:
                status = await self.session.start_rtmp(check_rtmp_url(msg.url))
            except RtmpUrlError as exc:
                await self.error(str(exc))
                return
        else:
            await self.session.stop_rtmp()
            status = None
        await self.send({"type": "rtmp", "rtmp": status})

    async def end(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close(reason)

    async def _report(self, session: Session) -> None:
        """Send stats every second and ``ended`` when the session ends, whoever ended it."""
        while not session.ended.is_set():
            await self.send({"type": "stats", **session.info()})
            try:
                await asyncio.wait_for(session.ended.wait(), STATS_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
        if self.session is session:
            self.session = None
        await self.send({"type": "ended", "session_id": session.id, "reason": session.end_reason})

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """The signaling connection ended; a session still running lost its peer without a goodbye."""
        if self.session is not None and not self.session.closing:
            self.state.metrics.sessions_reaped.inc()
        await self.end("peer vanished: signaling connection closed without bye")
        for task in list(self._tasks):
            task.cancel()


class SignalingHandler(Protocol):
    """What reads one signaling connection's messages: the server's own, or a front door's relay."""

    async def handle(self, data: str) -> None:
        """One text message."""

    async def error(self, message: str) -> None:
        """Tell the peer what was wrong."""

    async def shutdown(self) -> None:
        """The connection ended."""


async def websocket(request: web.Request) -> web.StreamResponse:
    """GET /ws: one signaling connection (at most ``ws_per_address`` open per client address)."""
    return await serve_websocket(request, lambda ws: _Connection(ws, request.app[STATE]))


async def serve_websocket(request: web.Request,
                          make_handler: Callable[[web.WebSocketResponse], SignalingHandler]) -> web.WebSocketResponse:
    """Serve one signaling WebSocket under the guard's socket cap and message rate: JSON text messages go to the
    handler ``make_handler`` builds for it; one failing message is reported, never the end of the connection."""
    guard = request.app[GUARD]
    address = guard.client_address(request)
    guard.open_socket(address)
    try:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=PROTOCOL_MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        handler = make_handler(ws)
        try:
            async for msg in ws:
                if not guard.message_allowed(address):
                    log.info("signaling connection from %s closed: over the message rate", address)
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                   message=b"too many messages: the limit is %g per second" % guard.settings.ws_rate)
                    break
                if msg.type == WSMsgType.TEXT:
                    try:
                        await handler.handle(msg.data)
                    except Exception as exc:  # noqa: BLE001 - one bad message must not end the connection
                        log.exception("signaling message failed")
                        await handler.error(f"internal error: {exc.__class__.__name__}: {exc}")
                elif msg.type == WSMsgType.BINARY:
                    await handler.error("binary messages are not supported; send JSON text")
                elif msg.type == WSMsgType.ERROR:
                    log.info("signaling connection dropped: %s", msg.data)
                    break
        finally:
            await handler.shutdown()
        return ws
    finally:
        guard.close_socket(address)
