"""The cluster's table of avatar hosts: capacity, placement (least loaded), and the session → host map.

Pure bookkeeping, no Ray: the registry actor (:mod:`cluster.registry`) owns one table and feeds it what it learns
from Ray (nodes that join or die) and from the hosts (their sessions, polled every second).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

PENDING_TTL_S = 60.0
ENDED_KEPT = 1000

# host states: only "ready" hosts take new sessions
STARTING, READY, UNREACHABLE, FAILED = "starting", "ready", "unreachable", "failed"


@dataclass
class Placement:
    """A slot reserved on one host for a session that is being started (settle it with the session id or None)."""

    ticket: str
    node_id: str
    node_ip: str
    url: str


@dataclass
class Refusal:
    """No host can take a session now; ``message`` says why (``full`` is True when every slot is in use)."""

    message: str
    full: bool


@dataclass
class Located:
    """Where a session is: the host running it, or why it ended when its host died."""

    url: str | None = None
    node_id: str | None = None
    ended: str | None = None


@dataclass
class Host:
    """One avatar host as the table sees it: its node, slots, state, sessions and last reported health."""

    node_id: str
    node_ip: str
    slots: int
    gpus: int = 0
    url: str | None = None
    state: str = STARTING
    error: str | None = None
    sessions: dict[str, float] = field(default_factory=dict)  # session id → when it was bound (monotonic)
    pending: dict[str, float] = field(default_factory=dict)  # ticket → when the reservation expires
    health: dict = field(default_factory=dict)  # the host's own /health body, last poll

    @property
    def load(self) -> int:
        """Slots in use: running sessions plus reservations being started."""
        return len(self.sessions) + len(self.pending)

    def as_dict(self) -> dict:
        """The host as the front doors' /health shows it."""
        infos = {s["id"]: s for s in self.health.get("sessions", [])}
        return {
            "node_id": self.node_id, "node_ip": self.node_ip, "url": self.url, "state": self.state,
            "slots": self.slots, "gpus": self.gpus, "sessions": len(self.sessions), "starting": len(self.pending),
            "session_ids": sorted(self.sessions),
            "session_info": [infos.get(sid, {"id": sid}) for sid in sorted(self.sessions)],
            "workers": self.health.get("workers", []),
            **({"error": self.error} if self.error else {}),
        }


class HostTable:
    """Hosts by node id, the reservations and sessions on each, and the sessions lost with a dead host."""

    def __init__(self) -> None:
        """An empty table."""
        self.hosts: dict[str, Host] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        self.placed_total = 0
        self.rejected_total = 0
        self.lost_total = 0

    def add(self, host: Host) -> None:
        """A host was launched on its node (it takes sessions once :meth:`ready`)."""
        self.hosts[host.node_id] = host

    def ready(self, node_id: str, url: str) -> None:
        """The host serves at ``url`` and takes sessions."""
        host = self.hosts.get(node_id)
        if host is not None:
            host.url, host.state, host.error = url, READY, None

    def fail(self, node_id: str, state: str, error: str) -> None:
        """The host takes no sessions for now (``UNREACHABLE`` until it answers again, or ``FAILED``)."""
        host = self.hosts.get(node_id)
        if host is not None:
            host.state, host.error = state, error

    def place(self, now: float | None = None) -> Placement | Refusal:
        """Reserve a slot on the least loaded ready host with one free (fewest sessions per slot, then most free)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        ready = [h for h in self.hosts.values() if h.state == READY and h.url]
        free = [h for h in ready if h.load < h.slots]
        if not free:
            self.rejected_total += 1
            if ready:
                slots = sum(h.slots for h in ready)
                return Refusal(f"cluster is full: all {slots} avatar slots on {len(ready)} host(s) are in use; "
                               "try again later", full=True)
            return Refusal(self._why_no_host(), full=False)
        host = min(free, key=lambda h: (h.load / h.slots, -(h.slots - h.load), h.node_id))
        ticket = secrets.token_urlsafe(9)
        host.pending[ticket] = now + PENDING_TTL_S
        self.placed_total += 1
        return Placement(ticket, host.node_id, host.node_ip, host.url)

    def settle(self, placement: Placement, session_id: str | None, now: float | None = None) -> None:
        """A reservation ends: the session started (``session_id``) or did not (None)."""
        host = self.hosts.get(placement.node_id)
        if host is None:
            return
        host.pending.pop(placement.ticket, None)
        if session_id is not None:
            host.sessions[session_id] = time.monotonic() if now is None else now

    def observe(self, node_id: str, health: dict, asked_at: float) -> None:
        """A host answered a poll sent at ``asked_at``: its sessions are what it reports, except those bound since
        the poll was sent; its state follows its own health (``ok`` → ready)."""
        host = self.hosts.get(node_id)
        if host is None:
            return
        reported = {s["id"] for s in health.get("sessions", [])}
        host.sessions = {sid: t for sid, t in host.sessions.items() if sid in reported or t >= asked_at}
        for sid in reported - host.sessions.keys():
            host.sessions[sid] = asked_at
        host.health = health
        if health.get("status") == "ok":
            host.state, host.error = READY, None
        else:
            errors = [w["error"] for w in health.get("workers", []) if w.get("error")]
            host.state = FAILED if health.get("status") == "error" else STARTING
            host.error = "; ".join(errors) or None

    def drop(self, node_id: str, reason: str) -> list[str]:
        """The host is gone: forget it and remember ``reason`` for each of its sessions; returns their ids."""
        host = self.hosts.pop(node_id, None)
        if host is None:
            return []
        self.lost_total += 1
        for sid in host.sessions:
            self.ended[sid] = reason
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)
        return sorted(host.sessions)

    def locate(self, session_id: str) -> Located | None:
        """The host of a running session, or the reason it ended with its host; None if unknown."""
        for host in self.hosts.values():
            if session_id in host.sessions and host.url:
                return Located(url=host.url, node_id=host.node_id)
        reason = self.ended.get(session_id)
        return None if reason is None else Located(ended=reason)

    def snapshot(self) -> dict:
        """Everything /health and /metrics of a front door show."""
        hosts = [h.as_dict() for h in sorted(self.hosts.values(), key=lambda h: h.node_ip)]
        ready = [h for h in self.hosts.values() if h.state == READY]
        return {
            "hosts": hosts,
            "slots": sum(h.slots for h in ready),
            "free_slots": sum(max(0, h.slots - h.load) for h in ready),
            "sessions": sum(len(h.sessions) for h in self.hosts.values()),
            "placed_total": self.placed_total,
            "rejected_total": self.rejected_total,
            "hosts_lost_total": self.lost_total,
        }

    def _why_no_host(self) -> str:
        if not self.hosts:
            return ("no avatar host in the cluster: start a node with "
                    "`ray start --address HEAD:PORT --resources '{\"avatar_slots\": N}'`")
        states = ", ".join(f"{h.node_ip}: {h.state}{f' ({h.error})' if h.error else ''}" for h in self.hosts.values())
        return f"no avatar host is ready ({states}); try again in a moment"

    def _expire(self, now: float) -> None:
        for host in self.hosts.values():
            host.pending = {t: until for t, until in host.pending.items() if until > now}
