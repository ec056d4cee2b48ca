"""The front door: ``live-avatar serve --cluster ADDRESS`` — the single server's routes, its sessions on hosts.

It joins the Ray cluster as a driver, finds (or creates) the registry of its profile, and serves the talk and
viewer pages itself; everything about a session is placed on or forwarded to the host that runs it. It holds no
session state of its own, so any number of front doors can run behind one HTTP load balancer.
"""

from __future__ import annotations

import logging
import socket

import aiohttp
import ray
from aiohttp import web
from ray.actor import ActorHandle

from live.settings import Settings
from signaling.app import base_app
from signaling.images import ImageStore

from . import forwarding, proxy, status
from .door import FRONT_DOOR, FrontDoor
from .names import NAMESPACE
from .registry import connect_registry

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or used; the message says what to check."""


def create_front_door(settings: Settings, address: str, registry: ActorHandle) -> web.Application:
    """The front door's application for ``settings``' profile, placing sessions through ``registry``."""
    door = FrontDoor(settings=settings, address=address, registry=registry,
                     images=ImageStore(settings.server.max_upload_bytes, settings.server.max_image_side))
    app = base_app()
    app[FRONT_DOOR] = door

    async def start(app: web.Application) -> None:
        door.http = aiohttp.ClientSession()

    async def stop(app: web.Application) -> None:
        await door.http.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    session_paths = ("/whip/{session}", "/whep/{session}", "/whep/{session}/{viewer}", "/api/sessions/{session}/rtmp",
                     "/api/sessions/{session}/tokens")
    app.add_routes([
        web.get("/ws", proxy.websocket),
        web.post("/whip", forwarding.publish),
        *(web.route(method, path, forwarding.on_host) for path in session_paths
          for method in ("GET", "POST", "PATCH", "DELETE")),
        web.get("/health", status.health),
        web.get("/metrics", status.metrics),
        web.post("/api/images", forwarding.upload_image),
        web.get("/api/config", forwarding.client_config),
    ])
    return app


def join_cluster(settings: Settings, address: str) -> ActorHandle:
    """Connect this process to the Ray cluster at ``address`` (HEAD:PORT, or ``auto`` for the one this machine
    belongs to) and return its profile's registry."""
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {exc} — start its head with "
                           "`ray start --head --port PORT` and run the front door on one of its nodes") from exc
    return connect_registry(settings)


def _check_reachable(address: str) -> None:
    """Fail at once, with the address, where ``ray.init`` would retry an unreachable head for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--cluster {address!r}: give the Ray head's address as HOST:PORT (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc}); "
                           "start its head with `ray start --head --port PORT`") from None


def serve_cluster(settings: Settings, address: str, host: str, port: int) -> None:
    """Serve a front door of the Ray cluster at ``address`` until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = join_cluster(settings, address)
    snapshot = ray.get(registry.snapshot.remote())
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def ready(_: str) -> None:
        hosts = ", ".join(f"{h['node_ip']} ({h['state']}, {h['slots']} slots)" for h in snapshot["hosts"]) or "none yet"
        print(f"live-avatar: front door of {address} serving {settings.name} on {host}:{port} — open "
              f"http://{shown}:{port}/ ; avatar hosts: {hosts}", flush=True)

    web.run_app(create_front_door(settings, address, registry), host=host, port=port, print=ready, access_log=None)
