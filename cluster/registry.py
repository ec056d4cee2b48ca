"""The registry: a named, detached Ray actor that keeps one host per slot node and the session → host map.

Every front door of a profile talks to the same registry (found by name), so they agree on capacity, on where
each session runs and on the access settings (API key, token secret). Once a second it reconciles with Ray: a node
that advertises ``avatar_slots`` gets an :class:`~cluster.host.AvatarHost` pinned to it, each host is polled for its
sessions (and told the nodes' addresses, which it trusts as proxies), and a host whose actor or node died is dropped
with its sessions (their ``ended`` reason is kept for viewers that come back).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from live.settings import AuthSettings, Settings
from signaling.images import ImageStore

from .host import AvatarHost
from .names import HEAD_RESOURCE, NAMESPACE, SLOT_RESOURCE, host_name, registry_name
from .placement import FAILED, UNREACHABLE, Host, HostTable, Located, Placement, Refusal

log = logging.getLogger(__name__)

WATCH_S = 1.0
STATUS_TIMEOUT_S = 3.0
RELAUNCH_AFTER_S = 30.0


@ray.remote(num_cpus=0, max_restarts=0)
class Registry:
    """Hosts, capacity and sessions of one profile across the cluster."""

    def __init__(self, settings: Settings) -> None:
        """Keep the hosts of ``settings``' profile; the watch loop starts with the first call. Without a
        ``token_secret`` the registry draws one for the cluster: hosts and front doors all sign with it."""
        auth = settings.server.auth
        if auth.token_secret is None:
            auth = auth.model_copy(update={"token_secret": secrets.token_urlsafe(32)})
        self.settings = settings.model_copy(update={"server": settings.server.model_copy(update={"auth": auth})})
        self.table = HostTable()
        self.images = ImageStore(settings.server.max_upload_bytes, settings.server.max_image_side)
        self._actors: dict[str, ActorHandle] = {}
        self._failed_at: dict[str, float] = {}
        self._node_ips: list[str] = []
        self._watch: asyncio.Task | None = None

    # ----- what front doors ask ----------------------------------------------------------------------------------
    async def place(self) -> Placement | Refusal:
        """Reserve a slot for a new session on the least loaded ready host, or say why none can take it."""
        await self._ensure_watching()
        return self.table.place()

    async def settle(self, placement: Placement, session_id: str | None) -> None:
        """The session of ``placement`` started (its id) or not (None)."""
        self.table.settle(placement, session_id)

    async def locate(self, session_id: str) -> Located | None:
        """Where a session runs, or why it ended with its host; None when unknown."""
        await self._ensure_watching()
        return self.table.locate(session_id)

    async def report_lost(self, node_id: str, reason: str) -> None:
        """A front door could not reach this host: no new sessions go there until it answers a poll again."""
        log.warning("host on node %s reported unreachable: %s", node_id, reason)
        self.table.fail(node_id, UNREACHABLE, reason)

    async def snapshot(self) -> dict:
        """Hosts, slots and sessions of the whole cluster (for /health and /metrics)."""
        await self._ensure_watching()
        return {"profile": self.settings.name, **self.table.snapshot()}

    async def auth(self) -> AuthSettings:
        """The cluster's access settings, token secret included (the hosts run with them; front doors must too)."""
        return self.settings.server.auth

    async def add_image(self, data: bytes) -> str:
        """Keep an uploaded (already validated) image for the cluster; returns its id."""
        return self.images.add(data)

    async def get_image(self, image_id: str) -> bytes | None:
        """The bytes of an uploaded image, if still kept."""
        return self.images.get(image_id)

    # ----- watching Ray --------------------------------------------------------------------------------------------
    async def _ensure_watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watch_forever())
            await self._reconcile()

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001 - the watch loop must outlive any one failure
                log.exception("reconciling the cluster failed")

    async def _reconcile(self) -> None:
        """Follow the nodes Ray knows: launch hosts on new slot nodes, drop hosts whose node died, poll the rest."""
        alive = [n for n in await asyncio.to_thread(ray.nodes) if n["Alive"]]
        self._node_ips = sorted({n["NodeManagerAddress"] for n in alive})  # front doors run on these: hosts trust them
        nodes = {n["NodeID"]: n for n in alive if n["Resources"].get(SLOT_RESOURCE, 0) >= 1}
        for node_id, host in list(self.table.hosts.items()):
            if node_id not in nodes:
                self._lose(node_id, f"avatar host {host.node_ip} died: its node left the Ray cluster")
            elif host.state == FAILED and time.monotonic() - self._failed_at.get(node_id, 0) > RELAUNCH_AFTER_S:
                self._lose(node_id, f"avatar host {host.node_ip} failed: {host.error}")
        for node_id, node in nodes.items():
            if node_id not in self.table.hosts:
                self._launch(node_id, node)
        await asyncio.gather(*(self._poll(h) for h in list(self.table.hosts.values()) if h.url))

    def _launch(self, node_id: str, node: dict) -> None:
        resources = node["Resources"]
        host = Host(node_id=node_id, node_ip=node["NodeManagerAddress"], slots=int(resources[SLOT_RESOURCE]),
                    gpus=0 if self.settings.device == "cpu" else int(resources.get("GPU", 0)))
        self.table.add(host)
        actor = AvatarHost.options(
            name=host_name(self.settings.name, node_id), namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached", resources={SLOT_RESOURCE: host.slots}, num_gpus=host.gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.settings, host.slots)
        self._actors[node_id] = actor
        log.info("launching an avatar host on node %s (%s, %d slots)", host.node_ip, node_id, host.slots)
        asyncio.ensure_future(self._start(host, actor))

    async def _start(self, host: Host, actor: ActorHandle) -> None:
        try:
            url = await actor.start.remote(self._node_ips)
        except RayError as exc:
            self._failed_at[host.node_id] = time.monotonic()
            self.table.fail(host.node_id, FAILED, _first_line(exc))
            log.error("avatar host on %s did not start: %s", host.node_ip, exc)
            return
        if self._actors.get(host.node_id) is actor:
            self.table.ready(host.node_id, url)
            log.info("avatar host on %s ready at %s", host.node_ip, url)

    async def _poll(self, host: Host) -> None:
        actor = self._actors.get(host.node_id)
        if actor is None:
            return
        asked_at = time.monotonic()
        try:
            health = await asyncio.wait_for(_awaitable(actor.status.remote(self._node_ips)), STATUS_TIMEOUT_S)
        except ActorDiedError as exc:
            self._lose(host.node_id, f"avatar host {host.node_ip} died: {_first_line(exc)}")
        except (RayError, asyncio.TimeoutError) as exc:
            self.table.fail(host.node_id, UNREACHABLE, f"no answer to a status poll: {exc.__class__.__name__}")
        else:
            self.table.observe(host.node_id, health, asked_at)
            if host.state == FAILED:
                self._failed_at.setdefault(host.node_id, time.monotonic())

    def _lose(self, node_id: str, reason: str) -> None:
        ended = self.table.drop(node_id, reason)
        self._failed_at.pop(node_id, None)
        actor = self._actors.pop(node_id, None)
        log.warning("%s; sessions ended: %s", reason, ", ".join(ended) or "none")
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass


async def _awaitable(ref: ray.ObjectRef):
    return await ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def connect_registry(settings: Settings) -> ActorHandle:
    """The registry of ``settings``' profile, created on the head node if no front door created it yet
    (``ray.init`` must have run)."""
    return Registry.options(name=registry_name(settings.name), namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached", resources={HEAD_RESOURCE: 0.001}).remote(settings)
