"""The avatar host: one Ray actor per node (per profile) running the single-server app on that node's address.

The actor holds the model stack, the engine workers and the aiortc peers of its sessions — everything
``live-avatar serve`` holds — behind ``signaling.app.create_app`` on an OS-assigned port of its node's IP, so the
front doors forward signaling to it and media flows straight between the user and this node.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from aiohttp import web

from live.session import SessionManager
from live.settings import Settings
from signaling.app import create_app
from signaling.guard import GUARD, Guard
from signaling.state import STATE


def session_manager(app: web.Application) -> SessionManager:
    """The sessions of a server app. A module-level function on purpose: Ray ships the actor class by value, with
    copies of the objects it names, so the actor must not name ``STATE`` itself (a copy is another key)."""
    return app[STATE].manager


def request_guard(app: web.Application) -> Guard:
    """The request guard of a server app (module level for the reason :func:`session_manager` gives)."""
    return app[GUARD]


@ray.remote(num_cpus=0, max_restarts=0)
class AvatarHost:
    """The sessions of one node: ``slots`` of them at most (the node's ``avatar_slots``)."""

    def __init__(self, settings: Settings, slots: int) -> None:
        """Serve ``settings`` with ``max_sessions`` = ``slots``; nothing starts until :meth:`start`."""
        server = settings.server.model_copy(update={"max_sessions": slots})
        self.settings = settings.model_copy(update={"server": server})
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._lock = asyncio.Lock()

    async def start(self, proxies: list[str]) -> str:
        """Load the models and serve, trusting ``proxies`` (the cluster's node addresses, where front doors run) to
        name the client in X-Forwarded-For; returns the host's URL (idempotent: a second call returns the same URL)."""
        async with self._lock:
            if self._url is None:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
                logging.getLogger("aioice").setLevel(logging.WARNING)
                self._app = create_app(self.settings)
                request_guard(self._app).trust(proxies)
                self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
                await self._runner.setup()  # on_startup: the models load here
                ip = ray.util.get_node_ip_address()
                site = web.TCPSite(self._runner, ip, 0)
                await site.start()
                self._url = f"http://{f'[{ip}]' if ':' in ip else ip}:{self._runner.addresses[0][1]}"
                logging.getLogger(__name__).info("avatar host serving %s on %s", self.settings.name, self._url)
        return self._url

    async def status(self, proxies: list[str]) -> dict:
        """The host's /health body (status, workers, sessions with their stats); ``proxies``: the cluster's node
        addresses now (the registry's polls keep the trusted proxies current as nodes join and leave)."""
        if self._app is None:
            return {"status": "starting", "workers": [], "sessions": []}
        request_guard(self._app).trust(proxies)
        return session_manager(self._app).health()
