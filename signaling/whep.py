"""WHEP playback: POST /whep/{session} with a (recvonly) SDP offer to watch any running session.

The response is ``201 Created`` with the SDP answer and ``Location: /whep/{session}/{viewer}``; ``DELETE`` on
that resource stops watching. Viewers do not count against ``max_sessions``; each session takes a bounded
number of them.
"""

from __future__ import annotations

from aiohttp import web

from live.peer import MAX_SDP_BYTES, OfferError, parse_offer
from live.session import ViewerLimit

from .http import error_response, read_sdp
from .state import RETRY_AFTER_S, STATE


async def play(request: web.Request) -> web.Response:
    """POST /whep/{session}: add a viewer to a session."""
    session_id = request.match_info["session"]
    session = request.app[STATE].manager.get(session_id)
    if session is None:
        return error_response(404, f"no session {session_id!r} is running")
    sdp = await read_sdp(request, MAX_SDP_BYTES)
    try:
        parse_offer(sdp, need=("video",))
        link, answer = await session.add_viewer(sdp)
    except OfferError as exc:
        return error_response(400, str(exc))
    except ViewerLimit as exc:
        return error_response(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": f"/whep/{session_id}/{link.id}"})


async def stop(request: web.Request) -> web.Response:
    """DELETE /whep/{session}/{viewer}: stop watching."""
    session = request.app[STATE].manager.get(request.match_info["session"])
    if session is None or not await session.remove_viewer(request.match_info["viewer"]):
        return error_response(404, "no such viewer")
    return web.Response(status=200)


async def patch(request: web.Request) -> web.Response:
    """PATCH on a viewer: trickle ICE / ICE restart are not supported."""
    return error_response(405, "trickle ICE and ICE restarts are not supported: send a complete offer",
                          {"Allow": "DELETE"})
