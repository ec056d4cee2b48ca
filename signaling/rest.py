"""Session outputs over REST: start, inspect and stop a session's RTMP push.

``POST /api/sessions/{session}/rtmp`` with ``{"url": "rtmp://host/app/key"}`` starts (or replaces) the push and
answers ``201 {"rtmp": status}``; ``GET`` answers ``{"rtmp": status | null}``; ``DELETE`` stops it. The status
(``state`` connecting | live | reconnecting | stopped, ``error``, ``reconnects``, ``live_s``, the URL with its
stream key hidden) is also in ``/health`` and the talk page's stats.
"""

from __future__ import annotations

import json

from aiohttp import web

from live.session import Session
from live.sinks.rtmp import RtmpUrlError

from .http import error_response
from .state import STATE

MAX_BODY_BYTES = 4096


def _session(request: web.Request) -> Session:
    session = request.app[STATE].manager.get(request.match_info["session"])
    if session is None or session.closing:
        raise web.HTTPNotFound(text=f"no session {request.match_info['session']!r} is running")
    return session


async def start_rtmp(request: web.Request) -> web.Response:
    """POST /api/sessions/{session}/rtmp: push the session to an RTMP URL."""
    session = _session(request)
    body = await request.content.read(MAX_BODY_BYTES + 1)
    try:
        data = json.loads(body) if len(body) <= MAX_BODY_BYTES else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        return error_response(400, 'send JSON {"url": "rtmp://host/app/stream-key"}')
    try:
        status = await session.start_rtmp(data["url"])
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
