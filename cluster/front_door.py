"""The front door: ``live-avatar serve --cluster ADDRESS`` — the single server's routes, its sessions on hosts.

It joins the Ray cluster as a driver, finds (or creates) the registry of its profile, and serves the talk and
viewer pages itself; everything about a session is placed on or forwarded to the host that runs it. It holds no
session state of its own, so any number of front doors can run behind one HTTP load balancer. It guards requests as
a single server does (Host, Origin, limits per client address) and shares the cluster's API key and token secret.
"""

from __future__ import annotations

import logging
import socket

import aiohttp
import ray
from aiohttp import web
from ray.actor import ActorHandle

from live.settings import AuthSettings, Settings
from signaling.app import base_app
from signaling.auth import Auth, check_exposure
from signaling.images import ImageStore

from . import forwarding, proxy, status
from .door import FRONT_DOOR, FrontDoor
from .names import NAMESPACE
from .registry import connect_registry

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or used; the message says what to check."""


def create_front_door(settings: Settings, address: str, registry: ActorHandle, node_ip: str) -> web.Application:
    """The front door's application for ``settings``' profile (bound to ``settings.server.host``, with the cluster's
    access settings), placing sessions through ``registry``. Its requests to hosts leave from ``node_ip``, its Ray
    node's address, which the hosts trust to name the client in X-Forwarded-For."""
    door = FrontDoor(settings=settings, address=address, registry=registry,
                     images=ImageStore(settings.server.max_upload_bytes, settings.server.max_image_side),
                     auth=Auth(settings.server.auth))
    app = base_app(settings)
    app[FRONT_DOOR] = door

    async def start(app: web.Application) -> None:
        door.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(node_ip, 0)))

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


def cluster_settings(settings: Settings, cluster: AuthSettings) -> Settings:
    """``settings`` with the cluster's token secret when they name none; any other difference from the cluster's
    ``server.auth`` (another API key or secret, …) is a :class:`ClusterError`: its hosts would disagree."""
    auth = settings.server.auth
    if auth.token_secret is None:
        auth = auth.model_copy(update={"token_secret": cluster.token_secret})
    differ = [name for name in AuthSettings.model_fields if getattr(auth, name) != getattr(cluster, name)]
    if differ:
        raise ClusterError(f"this front door's server.auth differs from the cluster's in {', '.join(differ)}: the "
                           "avatar hosts run with the settings of the first front door; start every front door with "
                           "the same ones (to change them, end the cluster's registry and hosts, e.g. `ray stop` on "
                           "every node)")
    return settings.model_copy(update={"server": settings.server.model_copy(update={"auth": auth})})


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


def serve_cluster(settings: Settings, address: str, host: str, port: int, insecure: bool = False) -> None:
    """Serve a front door of the Ray cluster at ``address`` until interrupted. Without an API key only a loopback
    ``host`` is served, unless ``insecure`` (raises ``ConfigError``), as for a single server."""
    check_exposure(host, settings.server.auth, insecure)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = join_cluster(settings, address)
    settings = cluster_settings(settings, ray.get(registry.auth.remote()))
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"host": host, "port": port})})
    snapshot = ray.get(registry.snapshot.remote())
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def ready(_: str) -> None:
        hosts = ", ".join(f"{h['node_ip']} ({h['state']}, {h['slots']} slots)" for h in snapshot["hosts"]) or "none yet"
        print(f"live-avatar: front door of {address} serving {settings.name} on {host}:{port} — open "
              f"http://{shown}:{port}/ ; avatar hosts: {hosts}", flush=True)

    app = create_front_door(settings, address, registry, ray.util.get_node_ip_address())
    web.run_app(app, host=host, port=port, print=ready, access_log=None)
