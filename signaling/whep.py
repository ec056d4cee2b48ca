"""WHEP playback: POST /whep/{session} with a (recvonly) SDP offer to watch a running session.

Watching needs the session's view (or control) token — ``Authorization: Bearer …`` or ``?token=…`` — or the API key.
The response is ``201 Created`` with the SDP answer and ``Location: /whep/{session}/{viewer}?token=<view token>``;
``DELETE`` there stops watching (any token of the session will do: the viewer id is known only to its creator).
Viewers do not count against ``max_sessions``; each session takes a bounded number of them.
"""

from __future__ import annotations

import logging

from aiohttp import web

from live.peer import MAX_SDP_BYTES, OfferError
from live.session import ViewerLimit

from .http import error_response, read_sdp
from .sdp import check_offer
from .state import RETRY_AFTER_S, STATE

log = logging.getLogger(__name__)


async def play(request: web.Request) -> web.Response:
    """POST /whep/{session}: add a viewer to a session."""
    state = request.app[STATE]
    session_id = request.match_info["session"]
    state.auth.require_session(request, session_id, "view")
    session = state.manager.get(session_id)
    if session is None:
        return error_response(404, f"no session {session_id!r} is running")
    sdp = await read_sdp(request, MAX_SDP_BYTES)
    try:
        check_offer(sdp, need=("video",))  # the voice goes to viewers that offer audio too
        link, sdp_answer = await session.add_viewer(sdp)
    except OfferError as exc:
        return error_response(400, str(exc))
    except ViewerLimit as exc:
        return error_response(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds for offers it cannot answer
        log.warning("session %s: viewer offer could not be answered: %s: %s", session_id, exc.__class__.__name__, exc)
        return error_response(400, f"the SDP offer could not be answered: {exc or exc.__class__.__name__}")
    token = state.auth.signer.issue(session_id, "view")
    return web.Response(status=201, text=sdp_answer, content_type="application/sdp",
                        headers={"Location": f"/whep/{session_id}/{link.id}?token={token}"})


async def stop(request: web.Request) -> web.Response:
    """DELETE /whep/{session}/{viewer}: stop watching."""
    session_id = request.match_info["session"]
    request.app[STATE].auth.require_session(request, session_id, "view")
    session = request.app[STATE].manager.get(session_id)
    if session is None or not await session.remove_viewer(request.match_info["viewer"]):
        return error_response(404, "no such viewer")
    return web.Response(status=200)


async def patch(request: web.Request) -> web.Response:
    """PATCH on a viewer: trickle ICE / ICE restart are not supported."""
    return error_response(405, "trickle ICE and ICE restarts are not supported: send a complete offer",
                          {"Allow": "DELETE"})
