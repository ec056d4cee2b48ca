"""The HTTP application: every endpoint on one port, and :func:`serve` to run it."""

from __future__ import annotations

import logging

from aiohttp import web

from live.metrics import ServerMetrics
from live.session import SessionManager
from live.settings import Settings

from . import http, rest, whep, whip, ws
from .auth import Auth, check_exposure
from .guard import GUARD, Guard, guard_requests
from .images import ImageStore
from .logs import quiet_client_faults
from .state import STATE, ServerState

log = logging.getLogger(__name__)


def base_app(settings: Settings) -> web.Application:
    """An application with the request guard of ``settings`` (Host, Origin, rate limits), the middlewares and the
    routes that hold no session state (pages, samples, static files): :func:`create_app` adds the sessions; a
    cluster front door (``cluster/``) forwards them to hosts."""
    app = web.Application(middlewares=[guard_requests, http.json_errors])
    app[GUARD] = Guard(settings.server.guard, settings.server.host)
    app.add_routes([
        web.get("/", http.index),
        web.get("/view/{session}", http.view),
        web.get("/api/samples", http.samples),
        web.get("/samples/{name}.png", http.sample_file),
        web.static("/static", http.WEB_DIR, follow_symlinks=False),
    ])
    return app


def create_app(settings: Settings) -> web.Application:
    """Build the application for a server bound to ``settings.server.host``; the models load (on worker threads)
    when it starts up."""
    metrics = ServerMetrics()
    state = ServerState(settings=settings, manager=SessionManager(settings, metrics), metrics=metrics,
                        images=ImageStore(settings.server.max_upload_bytes, settings.server.max_image_side),
                        auth=Auth(settings.server.auth))
    app = base_app(settings)
    app[STATE] = state

    async def start(app: web.Application) -> None:
        await state.manager.start()

    async def stop(app: web.Application) -> None:
        await state.manager.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.add_routes([
        web.get("/ws", ws.websocket),
        web.post("/whip", whip.publish),
        web.delete("/whip/{session}", whip.end),
        web.patch("/whip/{session}", whip.patch),
        web.post("/whep/{session}", whep.play),
        web.delete("/whep/{session}/{viewer}", whep.stop),
        web.patch("/whep/{session}/{viewer}", whep.patch),
        web.get("/health", http.health),
        web.get("/metrics", http.metrics),
        web.post("/api/images", http.upload_image),
        web.get("/api/config", http.client_config),
        web.get("/api/sessions/{session}/tokens", rest.tokens),
        web.post("/api/sessions/{session}/rtmp", rest.start_rtmp),
        web.get("/api/sessions/{session}/rtmp", rest.rtmp_status),
        web.delete("/api/sessions/{session}/rtmp", rest.stop_rtmp),
    ])
    return app


def serve(settings: Settings, host: str, port: int, insecure: bool = False) -> None:
    """Serve until interrupted; prints the URL to open once the model is loaded. Without an API key only a loopback
    ``host`` is served, unless ``insecure`` (raises ``ConfigError``)."""
    check_exposure(host, settings.server.auth, insecure)
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"host": host, "port": port})})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    quiet_client_faults()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{port}/"

    def ready(_: str) -> None:
        print(f"live-avatar: serving {settings.name} on {host}:{port} — open {url} and press Start", flush=True)
        if shown not in ("127.0.0.1", "localhost", "::1"):
            print("live-avatar: browsers allow the microphone only on https:// or localhost; "
                  "put a TLS proxy in front to talk from another machine", flush=True)

    web.run_app(create_app(settings), host=host, port=port, print=ready, access_log=None)
