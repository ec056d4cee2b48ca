"""WebSocket signaling at a front door's /ws: each session's messages relayed to the host that runs it.

The client speaks the protocol of :mod:`signaling.ws` unchanged. Messages are checked here with the same models
(so a bad one is refused before any host is involved); an offer places the session on the least loaded host and
opens a WebSocket to that host's ``/ws``; from then on every message goes through as it is, both ways. When the
host connection drops without an ``ended`` (its node died), the client gets ``ended`` with the reason. The socket
caps and the message rate of ``server.guard`` apply here, per client address, as on a single server.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import WSMsgType, web

from live.peer import OfferError, parse_offer
from live.sinks.tracks import check_h264_offer
from signaling.ws import (
    HEARTBEAT_S,
    PROTOCOL_MAX_MESSAGE_BYTES,
    ByeMessage,
    CandidateMessage,
    OfferMessage,
    parse_message,
    serve_websocket,
)

from .door import FRONT_DOOR, FrontDoor, HostUnreachable, forwarded_headers
from .placement import Placement, Refusal

log = logging.getLogger(__name__)

PLACEMENT_TRIES = 3
ANSWER_TIMEOUT_S = 120.0


class _Relay:
    """One client connection; it relays at most one session at a time to that session's host."""

    def __init__(self, ws: web.WebSocketResponse, door: FrontDoor, request: web.Request) -> None:
        self.ws = ws
        self.door = door
        self.path_qs = request.path_qs
        self.headers = {k: v for k, v in forwarded_headers(request).items()
                        if not k.lower().startswith("sec-websocket-")}
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.placement: Placement | None = None
        self.session_id: str | None = None
        self._pump: asyncio.Task | None = None
        self._closing = False

    async def send(self, payload: dict | str) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(payload if isinstance(payload, str) else json.dumps(payload))
        except (ConnectionError, RuntimeError):
            pass

    async def error(self, message: str) -> None:
        await self.send({"type": "error", "message": message})

    async def handle(self, text: str) -> None:
        """One client message: checked as the single server checks it, then placed or relayed."""
        try:
            data, msg = parse_message(text)
        except ValueError as exc:
            await self.error(str(exc))
            return
        if isinstance(msg, OfferMessage):
            await self.offer(data, msg)
        elif self.upstream is not None:
            try:
                await self.upstream.send_str(text)
            except (ConnectionError, RuntimeError):
                pass  # the host connection is closing; the relay task tells the client why
        elif isinstance(msg, CandidateMessage):
            await self.error("no session yet: send an offer before ICE candidates")
        elif not isinstance(msg, ByeMessage):
            await self.error("no session yet: send an offer first")

    async def offer(self, data: dict, msg: OfferMessage) -> None:
        """Place a new session and start it on its host; the host's answer (or error) goes back to the client."""
        if self.upstream is not None:
            await self.error("this connection already has a session; send bye first or open a new connection")
            return
        try:
            parse_offer(msg.sdp, need=("audio", "video"))
            check_h264_offer(msg.sdp)
        except OfferError as exc:
            await self.error(str(exc))
            return
        for _ in range(PLACEMENT_TRIES):
            placement = await self.door.place()
            if isinstance(placement, Refusal):
                await self.error(placement.message)
                return
            try:
                if await self._start_on(placement, data):
                    return
            except HostUnreachable as exc:
                await self.door.settle(placement, None)
                await self.door.lost(placement, str(exc))
            except web.HTTPException as exc:
                await self.door.settle(placement, None)
                await self.error(exc.text or exc.reason)
                return
        await self.error("no avatar host could start the session; try again in a moment")

    async def _start_on(self, placement: Placement, data: dict) -> bool:
        """Open the host's /ws and send the offer; True once the host answered (with an answer or an error)."""
        image = await self.door.host_image(placement.url, data.get("image"))
        try:
            upstream = await self.door.http.ws_connect(placement.url + self.path_qs, headers=self.headers,
                                                       heartbeat=HEARTBEAT_S, max_msg_size=PROTOCOL_MAX_MESSAGE_BYTES)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise HostUnreachable(f"cannot open {placement.url}/ws: {exc.__class__.__name__}: {exc}") from exc
        await upstream.send_str(json.dumps({**data, "image": image}))
        try:
            reply = await upstream.receive(ANSWER_TIMEOUT_S)
        except asyncio.TimeoutError:
            reply = None
        if reply is None or reply.type != WSMsgType.TEXT:
            await upstream.close()
            raise HostUnreachable(f"{placement.url}/ws did not answer the offer")
        answer = json.loads(reply.data)
        if answer.get("type") != "answer":
            await upstream.close()
            await self.door.settle(placement, None)
            await self.send(reply.data)
            return True
        self.upstream, self.placement, self.session_id = upstream, placement, answer["session_id"]
        await self.door.settle(placement, self.session_id)
        log.info("session %s placed on %s", self.session_id, placement.url)
        await self.send(reply.data)
        self._pump = asyncio.ensure_future(self._relay_host(upstream, placement))
        return True

    async def _relay_host(self, upstream: aiohttp.ClientWebSocketResponse, placement: Placement) -> None:
        """Host → client until the session ends; a host connection that drops first ends it with the reason."""
        ended = False
        async for msg in upstream:
            if msg.type != WSMsgType.TEXT:
                break
            await self.send(msg.data)
            if json.loads(msg.data).get("type") == "ended":
                ended = True
                break
        session_id = self.session_id
        if self.upstream is upstream:
            self.upstream, self.placement, self.session_id = None, None, None
        await upstream.close()
        if not ended and not self._closing:
            what = f"connection closed (code {upstream.close_code})" if upstream.close_code else "connection lost"
            reason = await self.door.lost(placement, f"signaling {what}")
            await self.send({"type": "ended", "session_id": session_id, "reason": reason})

    async def shutdown(self) -> None:
        """The client connection ended: closing the host connection ends the session there (peer vanished)."""
        self._closing = True
        if self.upstream is not None:
            await self.upstream.close()
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """GET /ws at a front door: one signaling connection (at most ``ws_per_address`` open per client address),
    relayed to the host of its session."""
    return await serve_websocket(request, lambda ws: _Relay(ws, request.app[FRONT_DOOR], request))
