"""A front door's HTTP session routes: WHIP places a new session, WHEP viewers and RTMP control go to the host
that has the session (found in the registry, so any front door serves any session), uploads go to the cluster."""

from __future__ import annotations

import asyncio

from aiohttp import web

from live.images import ImageError
from live.peer import MAX_SDP_BYTES, OfferError, parse_offer
from signaling.http import error_response, read_sdp
from signaling.rest import MAX_BODY_BYTES
from signaling.state import RETRY_AFTER_S

from .door import FRONT_DOOR, HostUnreachable
from .placement import Refusal
from .proxy import PLACEMENT_TRIES


async def publish(request: web.Request) -> web.Response:
    """POST /whip: place a new WHIP session on the least loaded host and forward the offer there."""
    door = request.app[FRONT_DOOR]
    sdp = await read_sdp(request, MAX_SDP_BYTES)
    try:
        parse_offer(sdp, need=("audio",))
    except OfferError as exc:
        return error_response(400, str(exc))
    for _ in range(PLACEMENT_TRIES):
        placement = await door.place()
        if isinstance(placement, Refusal):
            return error_response(503, placement.message, {"Retry-After": str(RETRY_AFTER_S)})
        try:
            query = request.query.copy()
            if "image" in query:
                query["image"] = await door.host_image(placement.url, query["image"])
            path_qs = str(request.rel_url.with_query(query))
            resp = await door.forward(request, placement.url, sdp.encode(), path_qs=path_qs)
        except HostUnreachable as exc:
            await door.settle(placement, None)
            await door.lost(placement, str(exc))
            continue
        except web.HTTPException:
            await door.settle(placement, None)
            raise
        location = resp.headers.get("Location", "")
        await door.settle(placement, location.rstrip("/").rsplit("/", 1)[-1] if resp.status == 201 else None)
        return resp
    return error_response(503, "no avatar host could start the session; try again in a moment",
                          {"Retry-After": str(RETRY_AFTER_S)})


async def on_host(request: web.Request) -> web.Response:
    """WHIP DELETE/PATCH, WHEP and RTMP control of a session: forwarded to the host that runs it. A caller
    without the API key or a genuine token of the session is refused here, before the session is looked up (as a
    single server does); the host checks the token's role."""
    door = request.app[FRONT_DOOR]
    door.auth.require_session(request, request.match_info["session"], "view")
    url = await door.locate(request.match_info["session"])
    if request.method in ("POST", "PATCH") and request.content_type == "application/sdp":
        body = (await read_sdp(request, MAX_SDP_BYTES)).encode()
    elif request.method in ("POST", "PATCH"):
        body = await request.content.read(MAX_BODY_BYTES + 1)
    else:
        body = None
    try:
        return await door.forward(request, url, body)
    except HostUnreachable as exc:
        return error_response(502, f"the host of session {request.match_info['session']} does not answer "
                                   f"(it may have died): {exc}", {"Retry-After": str(RETRY_AFTER_S)})


async def upload_image(request: web.Request) -> web.Response:
    """POST /api/images: validate here, keep in the cluster (any front door and host can use it)."""
    door = request.app[FRONT_DOOR]
    store = door.images
    if not request.content_type.startswith("image/"):
        return error_response(415, "upload the image itself with Content-Type image/png, image/jpeg or image/webp "
                                   f"(got {request.content_type or 'none'})")
    data = await request.content.read(store.max_bytes + 1)
    try:
        img = await asyncio.to_thread(store.validate, data)
    except ImageError as exc:
        return error_response(413 if len(data) > store.max_bytes else 400, f"upload rejected: {exc}")
    image_id = await door.registry.add_image.remote(data)
    return web.json_response({"image_id": image_id, "width": img.width, "height": img.height}, status=201)


async def client_config(request: web.Request) -> web.Response:
    """GET /api/config: the STUN/TURN servers of this profile (the hosts use the same)."""
    servers = request.app[FRONT_DOOR].settings.server.ice_servers
    return web.json_response({"ice_servers": [s.for_browser() for s in servers]},
                             headers={"Cache-Control": "no-store"})
