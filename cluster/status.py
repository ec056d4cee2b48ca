"""A front door's /health and /metrics: the whole cluster (hosts, slots, sessions per host), from the registry.

As on a single server, anonymous callers of /health see counts only (sessions and their hosts need the API key),
and /metrics needs the key unless ``server.auth.public_metrics``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .door import FRONT_DOOR
from .placement import READY

# what an anonymous /health leaves out: where the cluster and its hosts are, and which sessions run
ADMIN_KEYS = frozenset({"cluster", "sessions"})
ADMIN_HOST_KEYS = frozenset({"node_id", "url", "session_ids"})


def cluster_health(snapshot: dict, address: str, admin: bool) -> dict:
    """The body of a front door's GET /health: ``ok`` while a host takes sessions, every host with its counts and,
    for an ``admin``, the cluster's address and every session with its host."""
    hosts = snapshot["hosts"]
    ready = [h for h in hosts if h["state"] == READY]
    status = "ok" if ready else ("starting" if hosts else "no_hosts")
    sessions = [{**info, "host": h["node_ip"], "node_id": h["node_id"]} for h in hosts for info in h["session_info"]]
    body = {
        "status": status,
        "cluster": address,
        "config": snapshot["profile"],
        "max_sessions": snapshot["slots"],
        "free_slots": snapshot["free_slots"],
        "session_count": len(sessions),
        "hosts": [{k: v for k, v in h.items() if k != "session_info" and (admin or k not in ADMIN_HOST_KEYS)}
                  for h in hosts],
        "sessions": sessions,
    }
    return body if admin else {k: v for k, v in body.items() if k not in ADMIN_KEYS}


class _Snapshot(Collector):
    """Prometheus families of one registry snapshot."""

    def __init__(self, snapshot: dict) -> None:
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot
        hosts = GaugeMetricFamily("live_avatar_cluster_hosts", "Avatar hosts by state", labels=["state"])
        by_state: dict[str, int] = {}
        for h in snap["hosts"]:
            by_state[h["state"]] = by_state.get(h["state"], 0) + 1
        for state in sorted({READY, *by_state}):
            hosts.add_metric([state], by_state.get(state, 0))
        yield hosts
        per_host = {
            "live_avatar_cluster_host_slots": ("Avatar slots of a host", "slots"),
            "live_avatar_cluster_host_sessions": ("Sessions running on a host", "sessions"),
            "live_avatar_cluster_host_gpus": ("GPUs a host holds", "gpus"),
        }
        for name, (doc, key) in per_host.items():
            family = GaugeMetricFamily(name, doc, labels=["host", "node_id"])
            for h in snap["hosts"]:
                family.add_metric([h["node_ip"], h["node_id"]], h[key])
            yield family
        yield GaugeMetricFamily("live_avatar_cluster_slots", "Avatar slots on ready hosts", value=snap["slots"])
        yield GaugeMetricFamily("live_avatar_cluster_free_slots", "Free avatar slots on ready hosts",
                                value=snap["free_slots"])
        yield GaugeMetricFamily("live_avatar_cluster_sessions", "Sessions running in the cluster",
                                value=snap["sessions"])
        yield CounterMetricFamily("live_avatar_cluster_sessions_placed", "Sessions placed on a host",
                                  value=snap["placed_total"])
        yield CounterMetricFamily("live_avatar_cluster_sessions_rejected", "Sessions refused: no free slot",
                                  value=snap["rejected_total"])
        yield CounterMetricFamily("live_avatar_cluster_hosts_lost", "Hosts dropped after they died",
                                  value=snap["hosts_lost_total"])


def render_metrics(snapshot: dict) -> bytes:
    """Prometheus text exposition of a registry snapshot."""
    registry = CollectorRegistry()
    registry.register(_Snapshot(snapshot))
    return generate_latest(registry)


async def health(request: web.Request) -> web.Response:
    """GET /health at a front door: the cluster (503 while no host is there at all)."""
    door = request.app[FRONT_DOOR]
    body = cluster_health(await door.registry.snapshot.remote(), door.address, door.auth.is_admin(request))
    return web.json_response(body, status=503 if body["status"] == "no_hosts" else 200,
                             headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics at a front door: cluster gauges and counters (each host also serves its own /metrics); the API
    key unless ``auth.public_metrics`` (the labels name hosts)."""
    door = request.app[FRONT_DOOR]
    if not door.settings.server.auth.public_metrics:
        door.auth.require_admin(request, "/metrics")
    snapshot = await door.registry.snapshot.remote()
    return web.Response(body=render_metrics(snapshot), headers={"Content-Type": CONTENT_TYPE_LATEST})
