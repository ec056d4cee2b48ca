"""Plain HTTP endpoints: pages, health, metrics, image upload and samples; the JSON error convention and request
bodies (SDP, JSON) read whole and bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

import web as web_assets
from live.images import ImageError, builtin_characters, photo_warning

from .state import STATE

log = logging.getLogger(__name__)

WEB_DIR = Path(web_assets.__file__).resolve().parent
FORWARDED_HEADERS = ("Retry-After", "Allow", "WWW-Authenticate")


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
    except ConnectionResetError:
        log.info("client %s went away during %s %s", request.remote, request.method, request.path)
        return error_response(400, "the connection was reset before the request was complete")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error; the server log has the details")


async def read_body(request: web.Request, max_bytes: int, what: str) -> bytes:
    """The whole request body, or 413 naming ``what`` when it is larger than ``max_bytes`` (declared or sent)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content_length,
                                            text=f"{what} is larger than {max_bytes} bytes")
    body = bytearray()
    try:
        while len(body) <= max_bytes:  # read() returns what has arrived so far, not the whole body
            chunk = await request.content.read(max_bytes + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except (RequestPayloadError, HttpProcessingError) as exc:
        cause = exc.__cause__ or exc
        detail = " ".join(str(cause).split())
        raise web.HTTPBadRequest(text=f"the body of the request could not be read ({detail}); check its "
                                      "Content-Encoding and Transfer-Encoding") from None
    if len(body) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(body),
                                            text=f"{what} is larger than {max_bytes} bytes")
    return bytes(body)


async def read_sdp(request: web.Request, max_bytes: int) -> str:
    """The body of a WHIP/WHEP request: an ``application/sdp`` offer of at most ``max_bytes``."""
    if request.content_type != "application/sdp":
        raise web.HTTPUnsupportedMediaType(
            text=f"send the SDP offer with Content-Type: application/sdp (got {request.content_type or 'none'})")
    body = await read_body(request, max_bytes, "SDP offer")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="SDP offer is not UTF-8 text") from None


def parse_json(text: str | bytes) -> Any:
    """JSON text → value; raises ``ValueError`` with a readable reason (syntax, encoding, nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ValueError("not valid JSON: the text is not UTF-8") from None
    except RecursionError:
        raise ValueError("not valid JSON here: it is nested too deeply") from None


async def read_json(request: web.Request, max_bytes: int, example: str) -> Any:
    """The body of a JSON endpoint: ``Content-Type: application/json`` (so browsers preflight it cross-origin),
    at most ``max_bytes``; ``example`` shows the expected shape in errors."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=f"send JSON {example} with Content-Type: application/json (got {request.content_type or 'none'})")
    try:
        return parse_json(await read_body(request, max_bytes, "JSON body"))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{exc}; send JSON {example}") from None


async def index(request: web.Request) -> web.FileResponse:
    """GET /: the talk page."""
    return web.FileResponse(WEB_DIR / "index.html")


async def view(request: web.Request) -> web.FileResponse:
    """GET /view/{session}: the chrome-less viewer page (it finds the session id in its URL)."""
    return web.FileResponse(WEB_DIR / "view.html")


async def health(request: web.Request) -> web.Response:
    """GET /health: status, model/config, workers and the number of sessions; with the API key (or on an open
    server) also each session with its id, and the config's paths."""
    state = request.app[STATE]
    body = state.manager.health()
    body["session_count"] = len(body["sessions"])
    if not state.auth.is_admin(request):
        for key in ("sessions", "source"):
            body.pop(key, None)
        body.get("model", {}).pop("weights", None)
    return web.json_response(body, status=503 if body["status"] == "error" else 200,
                             headers={"Cache-Control": "no-store"})


async def client_config(request: web.Request) -> web.Response:
    """GET /api/config: what the pages and ``live-avatar client`` need to connect: ``{"ice_servers": [...],
    "publish_needs_key": bool}``, each server an ``RTCIceServer`` dictionary (``urls``, and ``username``/``credential``
    for TURN); ``publish_needs_key``: starting a session needs the API key (``auth.publish: key``)."""
    settings = request.app[STATE].settings.server
    return web.json_response({"ice_servers": [s.for_browser() for s in settings.ice_servers],
                              "publish_needs_key": settings.auth.publish == "key"},
                             headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition (needs the API key unless ``auth.public_metrics``)."""
    state = request.app[STATE]
    if not state.settings.server.auth.public_metrics:
        state.auth.require_admin(request, "/metrics")
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def upload_image(request: web.Request) -> web.Response:
    """POST /api/images: the raw image as the body (Content-Type image/*) → 201 ``{"image_id", "width", "height"}``."""
    store = request.app[STATE].images
    if not request.content_type.startswith("image/"):
        return error_response(415, "upload the image itself with Content-Type image/png, image/jpeg or image/webp "
                                   f"(got {request.content_type or 'none'})")
    try:
        data = await read_body(request, store.max_bytes, "the image")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"upload rejected: the image is larger than the {store.max_bytes}-byte limit")
    try:
        img = await asyncio.to_thread(store.validate, data)
    except ImageError as exc:
        return error_response(400, f"upload rejected: {exc}")
    body = {"image_id": store.add(data), "width": img.width, "height": img.height}
    warning = photo_warning(request.app[STATE].settings.video.reference_photos)
    if warning is not None:
        body["warning"] = warning
    return web.json_response(body, status=201)


async def samples(request: web.Request) -> web.Response:
    """GET /api/samples: the built-in reference images."""
    return web.json_response([{"name": name, "url": f"/samples/{name}.png"} for name in builtin_characters()])


async def sample_file(request: web.Request) -> web.FileResponse:
    """GET /samples/{name}.png: one built-in image."""
    path = builtin_characters().get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound(text=f"no sample image named {request.match_info['name']!r}")
    return web.FileResponse(path)
