"""Session control over REST: a session's tokens, and its RTMP push (start, inspect, stop).

Every endpoint needs the session's control token (``Authorization: Bearer …`` or ``?token=…``) or the API key.

``GET /api/sessions/{session}/tokens`` answers fresh ``{"view_token", "control_token", "expires_at", "view_url"}``
(e.g. a viewer link for a session that OBS publishes over WHIP).
``POST /api/sessions/{session}/rtmp`` with ``{"url": "rtmp://host/app/key"}`` (``Content-Type: application/json``)
starts (or replaces) the push and answers ``201 {"rtmp": status}``; ``GET`` answers ``{"rtmp": status | null}``;
``DELETE`` stops it. The status (``state`` connecting | live | reconnecting | stopped, ``error``, ``reconnects``,
``live_s``, the URL with its stream key hidden) is also in ``/health`` and the talk page's stats.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from live.session import Session
from live.sinks.rtmp import RtmpUrlError, check_url

from .http import error_response, read_json
from .state import STATE

MAX_BODY_BYTES = 4096
RTMP_EXAMPLE = '{"url": "rtmp://host/app/stream-key"}'


def check_rtmp_url(url: str) -> str:
    """A usable ``rtmp://`` / ``rtmps://`` URL, stripped; raises ``RtmpUrlError`` saying what is wrong."""
    try:
        url = check_url(url)
        urlsplit(url).port
    except RtmpUrlError:
        raise
    except ValueError as exc:  # urlsplit: a bracketed host that is not an IPv6 address, a port out of range
        raise RtmpUrlError(f"RTMP URL is malformed ({exc}); it must look like rtmp://host[:port]/app/stream-key "
                           "with a port of 1-65535") from None
    return url


def _session(request: web.Request) -> Session:
    """The session named in the path, for a caller holding its control token or the API key."""
    session_id = request.match_info["session"]
    request.app[STATE].auth.require_session(request, session_id, "control")
    session = request.app[STATE].manager.get(session_id)
    if session is None or session.closing:
        raise web.HTTPNotFound(text=f"no session {session_id!r} is running")
    return session


async def tokens(request: web.Request) -> web.Response:
    """GET /api/sessions/{session}/tokens: fresh view and control tokens of the session."""
    session = _session(request)
    return web.json_response({"session_id": session.id, **request.app[STATE].auth.tokens(session.id)},
                             headers={"Cache-Control": "no-store"})


async def start_rtmp(request: web.Request) -> web.Response:
    """POST /api/sessions/{session}/rtmp: push the session to an RTMP URL."""
    session = _session(request)
    data = await read_json(request, MAX_BODY_BYTES, RTMP_EXAMPLE)
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        return error_response(400, f"send JSON {RTMP_EXAMPLE}")
    try:
        status = await session.start_rtmp(check_rtmp_url(data["url"]))
    except RtmpUrlError as exc:
        return error_response(400, str(exc))
    return web.json_response({"rtmp": status}, status=201)


async def rtmp_status(request: web.Request) -> web.Response:
    """GET /api/sessions/{session}/rtmp: the push's status (null when there is none)."""
    session = _session(request)
    return web.json_response({"rtmp": None if session.rtmp is None else session.rtmp.status.as_dict()})


async def stop_rtmp(request: web.Request) -> web.Response:
    """DELETE /api/sessions/{session}/rtmp: stop the push."""
    if not await _session(request).stop_rtmp():
        return error_response(404, "this session has no RTMP push")
    return web.json_response({"rtmp": None})
