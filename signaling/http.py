"""Plain HTTP endpoints: pages, health, metrics, image upload and samples; the JSON error convention."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

import web as web_assets
from live.images import ImageError, builtin_characters

from .state import STATE

log = logging.getLogger(__name__)

WEB_DIR = Path(web_assets.__file__).resolve().parent
FORWARDED_HEADERS = ("Retry-After", "Allow")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error as every endpoint reports it: ``{"type": "error", "message": ...}``."""
    return web.json_response({"type": "error", "message": message}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Report every HTTP error as JSON with a clear message; an unexpected exception is a 500, never a crash."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text or ""
        message = exc.reason if not text or text.startswith(f"{exc.status}:") else text
        headers = {k: v for k, v in exc.headers.items() if k in FORWARDED_HEADERS}
        return error_response(exc.status, message, headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error; the server log has the details")


async def read_sdp(request: web.Request, max_bytes: int) -> str:
    """The body of a WHIP/WHEP request: an ``application/sdp`` offer of at most ``max_bytes``."""
    if request.content_type != "application/sdp":
        raise web.HTTPUnsupportedMediaType(
            text=f"send the SDP offer with Content-Type: application/sdp (got {request.content_type or 'none'})")
    body = b""
    while len(body) <= max_bytes:  # read() returns what has arrived so far, not the whole body
        chunk = await request.content.read(max_bytes + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(body),
                                            text=f"SDP offer is larger than {max_bytes} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="SDP offer is not UTF-8 text") from None


async def index(request: web.Request) -> web.FileResponse:
    """GET /: the talk page."""
    return web.FileResponse(WEB_DIR / "index.html")


async def view(request: web.Request) -> web.FileResponse:
    """GET /view/{session}: the chrome-less viewer page (it finds the session id in its URL)."""
    return web.FileResponse(WEB_DIR / "view.html")


async def health(request: web.Request) -> web.Response:
    """GET /health: status, model/config, workers and sessions with ids and ages."""
    body = request.app[STATE].manager.health()
    return web.json_response(body, status=503 if body["status"] == "error" else 200)


async def client_config(request: web.Request) -> web.Response:
    """GET /api/config: what the pages and ``live-avatar client`` need to connect: ``{"ice_servers": [...]}``, each
    an ``RTCIceServer`` dictionary (``urls``, and ``username``/``credential`` for TURN)."""
    servers = request.app[STATE].settings.server.ice_servers
    return web.json_response({"ice_servers": [s.for_browser() for s in servers]},
                             headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition."""
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def upload_image(request: web.Request) -> web.Response:
    """POST /api/images: the raw image as the body (Content-Type image/*) → 201 ``{"image_id", "width", "height"}``."""
    store = request.app[STATE].images
    if not request.content_type.startswith("image/"):
        return error_response(415, "upload the image itself with Content-Type image/png, image/jpeg or image/webp "
                                   f"(got {request.content_type or 'none'})")
    if request.content_length is not None and request.content_length > store.max_bytes:
        return error_response(413, f"upload rejected: image is {request.content_length} bytes, more than the "
                                   f"{store.max_bytes}-byte limit")
    data = await request.content.read(store.max_bytes + 1)
    try:
        img = await asyncio.to_thread(store.validate, data)
    except ImageError as exc:
        return error_response(413 if len(data) > store.max_bytes else 400, f"upload rejected: {exc}")
    return web.json_response({"image_id": store.add(data), "width": img.width, "height": img.height}, status=201)


async def samples(request: web.Request) -> web.Response:
    """GET /api/samples: the built-in reference images."""
    return web.json_response([{"name": name, "url": f"/samples/{name}.png"} for name in builtin_characters()])


async def sample_file(request: web.Request) -> web.FileResponse:
    """GET /samples/{name}.png: one built-in image."""
    path = builtin_characters().get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound(text=f"no sample image named {request.match_info['name']!r}")
    return web.FileResponse(path)
