"""WHIP ingest (RFC 9725): POST /whip with an SDP offer starts a session driven by the client's audio.

The response is ``201 Created`` with the SDP answer and ``Location: /whip/{session}``; ``DELETE`` on that
resource ends the session. Watch the avatar with WHEP at ``/whep/{session}`` or the page ``/view/{session}``.
Query parameters choose the session: ``?image=<sample name | upload id>&prompt=...``. aiortc answers with every
candidate gathered, so trickle ICE (PATCH) is not supported (405).
"""

from __future__ import annotations

from aiohttp import web

from live.peer import MAX_SDP_BYTES, OfferError, parse_offer
from live.session import AdmissionError, EngineStartError

from .http import error_response, read_sdp
from .images import resolve_options
from .state import RETRY_AFTER_S, STATE


async def publish(request: web.Request) -> web.Response:
    """POST /whip: start a session from a WHIP client's offer."""
    state = request.app[STATE]
    sdp = await read_sdp(request, MAX_SDP_BYTES)
    try:
        parse_offer(sdp, need=("audio",))
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
        answer = await session.connect_ingest(sdp)
    except OfferError as exc:
        await session.close("offer rejected")
        return error_response(400, str(exc))
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": f"/whip/{session.id}"})


async def end(request: web.Request) -> web.Response:
    """DELETE /whip/{session}: end the session."""
    session = request.app[STATE].manager.get(request.match_info["session"])
    if session is None or session.kind != "whip":
        return error_response(404, f"no WHIP session {request.match_info['session']!r}")
    await session.close("WHIP client ended the session")
    return web.Response(status=200)


async def patch(request: web.Request) -> web.Response:
    """PATCH /whip/{session}: trickle ICE / ICE restart are not supported."""
    return error_response(405, "trickle ICE and ICE restarts are not supported: send a complete offer",
                          {"Allow": "DELETE"})
