"""WHIP ingest (RFC 9725): POST /whip with an SDP offer starts a session driven by the client's audio.

The response is ``201 Created`` with the SDP answer, ``Location: /whip/{session}?token=<control token>`` (a
``DELETE`` there ends the session; the token in it authorizes that) and ``X-View-Token`` (watch the avatar with
WHEP at ``/whep/{session}`` or the page ``/view/{session}?token=…``). ``Authorization: Bearer <API key>`` is
accepted, and needed when ``server.auth.publish`` is ``key``. Query parameters choose the session:
``?image=<sample name | upload id>&prompt=...``. aiortc answers with every candidate gathered, so trickle ICE
(PATCH) is not supported (405).
"""

from __future__ import annotations

import logging

from aiohttp import web

from live.peer import MAX_SDP_BYTES, OfferError
from live.session import AdmissionError, EngineStartError

from .auth import credential
from .http import error_response, read_sdp
from .images import resolve_options
from .sdp import answer, check_offer
from .state import RETRY_AFTER_S, STATE

log = logging.getLogger(__name__)


async def publish(request: web.Request) -> web.Response:
    """POST /whip: start a session from a WHIP client's offer."""
    state = request.app[STATE]
    state.auth.require_publisher(credential(request))
    sdp = await read_sdp(request, MAX_SDP_BYTES)
    try:
        check_offer(sdp, need=("audio",))
        options = await resolve_options(state.images, request.query.get("image"), request.query.get("prompt"))
    except (OfferError, ValueError) as exc:
        return error_response(400, str(exc))
    try:
        session = await state.manager.create("whip", options)
    except AdmissionError as exc:
        return error_response(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    except EngineStartError as exc:
        return error_response(500, str(exc))
    try:
        sdp_answer = await answer(session, session.connect_ingest(sdp))
    except OfferError as exc:
        return error_response(400, str(exc))
    tokens = state.auth.tokens(session.id)
    if state.auth.open:
        log.info("session %s (WHIP): viewer link %s", session.id, tokens["view_url"])
    return web.Response(status=201, text=sdp_answer, content_type="application/sdp",
                        headers={"Location": f"/whip/{session.id}?token={tokens['control_token']}",
                                 "X-View-Token": tokens["view_token"]})


async def end(request: web.Request) -> web.Response:
    """DELETE /whip/{session}: end the session (control token or API key)."""
    session_id = request.match_info["session"]
    request.app[STATE].auth.require_session(request, session_id, "control")
    session = request.app[STATE].manager.get(session_id)
    if session is None or session.kind != "whip":
        return error_response(404, f"no WHIP session {session_id!r}")
    await session.close("WHIP client ended the session")
    return web.Response(status=200)


async def patch(request: web.Request) -> web.Response:
    """PATCH /whip/{session}: trickle ICE / ICE restart are not supported."""
    return error_response(405, "trickle ICE and ICE restarts are not supported: send a complete offer",
                          {"Allow": "DELETE"})
