"""Browser safety and abuse limits in front of every endpoint (settings: ``server.guard``; docs/security.md).

- Host allow-list (DNS rebinding): IP addresses, ``localhost``, the bind host and ``allowed_hosts``.
- Origin allow-list on ``/ws`` and on every POST/DELETE/PATCH a browser sends: the server's own origin (the
  ``Host`` it was reached at), ``allowed_origins`` and ``cors_origins``. Requests without ``Origin`` come from
  programs (OBS, ffmpeg, curl, aiortc), not from pages, and pass.
- CORS headers only for ``cors_origins``.
- Per-address token buckets for HTTP requests and WebSocket messages, and caps on open WebSockets.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

from live.settings import GuardSettings

from .http import error_response

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
TRACKED_ADDRESSES = 10_000
CORS_MAX_AGE_S = 600
EXPOSED_HEADERS = "Location, Link, X-View-Token, Retry-After"
SOCKET_RETRY_S = 5
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        """A full bucket."""
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self) -> float:
        """Spend a token: 0 when there was one, else the seconds until there will be."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per client address; the least recently seen are forgotten beyond ``TRACKED_ADDRESSES``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        """Buckets of ``rate`` per second and ``burst``."""
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, address: str) -> float:
        """Spend one of ``address``'s tokens: 0 when allowed, else the seconds to wait."""
        bucket = self._buckets.pop(address, None) or TokenBucket(self.rate, self.burst, self.clock)
        self._buckets[address] = bucket
        while len(self._buckets) > TRACKED_ADDRESSES:
            self._buckets.popitem(last=False)
        return bucket.take()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (IPv6 in brackets) → lower-case host without brackets and the port, if any; None when
    ``value`` is not of that form."""
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return (parts.hostname or "").rstrip("."), port


class Guard:
    """The checks of one server; :func:`guard_requests` applies them to every request."""

    def __init__(self, settings: GuardSettings, bind_host: str, clock: Callable[[], float] = time.monotonic) -> None:
        """Checks from ``settings`` for a server bound to ``bind_host``."""
        self.settings = settings
        self.bind_host = bind_host.strip("[]").lower()
        self.http = RateLimiter(settings.http_rate, settings.http_burst, clock)
        self.messages = RateLimiter(settings.ws_rate, settings.ws_burst, clock)
        self.sockets: dict[str, int] = {}
        self._trusted = set(settings.trusted_proxies)

    # ----- who and where ---------------------------------------------------------------------------------
    def trust(self, proxies: Iterable[str]) -> None:
        """Trust ``proxies`` as well as ``trusted_proxies`` to name the client in X-Forwarded-For (a cluster's
        avatar host: its front doors' nodes)."""
        self._trusted = set(self.settings.trusted_proxies) | set(proxies)

    def client_address(self, request: web.Request) -> str:
        """The client's address: the peer, or behind a trusted proxy the last X-Forwarded-For hop it did not add."""
        address = request.remote or "unknown"
        if address in self._trusted:
            for hop in reversed(request.headers.get("X-Forwarded-For", "").split(",")):
                hop = hop.strip()
                if hop and hop not in self._trusted:
                    return hop
        return address

    def host_allowed(self, host: str) -> bool:
        """Whether a request for ``host`` (the Host header's name) is for this server, not a rebound DNS name."""
        if not host or _is_ip(host) or host in LOOPBACK_NAMES or host == self.bind_host:
            return True
        for pattern in self.settings.allowed_hosts:
            if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False

    def origin_allowed(self, origin: str, request: web.Request) -> bool:
        """Whether a page on ``origin`` may use this server: its own pages, or configured origins."""
        origin = origin.lower()
        if origin in self.settings.allowed_origins or origin in self.settings.cors_origins:
            return True
        parts = urlsplit(origin)
        try:
            port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        host, host_port = _split_host(request.host) or ("", None)
        # Behind a TLS proxy the Host has no port and the page's origin is https: compare with its default port.
        expected = host_port if host_port is not None else DEFAULT_PORTS.get(parts.scheme)
        return bool(parts.hostname) and parts.hostname == host and port == expected

    # ----- the middleware --------------------------------------------------------------------------------
    async def check(self, request: web.Request, handler) -> web.StreamResponse:
        """Host, rate and Origin checks before ``handler``; CORS and security headers after it."""
        split = _split_host(request.host)
        if split is None:
            return error_response(400, f"the Host header {request.host[:100]!r} is not a host[:port]")
        host, _ = split
        if not self.host_allowed(host):
            return error_response(400, f"this server does not answer for host {host!r}; if that name is right, add "
                                       "it to server.guard.allowed_hosts (LIVE_AVATAR_SERVER__GUARD__ALLOWED_HOSTS)")
        wait = self.http.take(self.client_address(request))
        if wait:
            seconds = max(1, math.ceil(wait))
            return error_response(429, f"too many requests from your address (limit: {self.settings.http_rate:g} "
                                       f"per second); retry in {seconds} s", {"Retry-After": str(seconds)})
        origin = request.headers.get("Origin")
        cors = origin is not None and origin.lower() in self.settings.cors_origins
        if cors and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=self._cors_headers(origin, preflight=True))
        if origin is not None and (request.method in UNSAFE_METHODS or request.path == "/ws"):
            if not self.origin_allowed(origin, request):
                return error_response(403, f"pages on {origin} may not use this server; if they should, add the "
                                           "origin to server.guard.allowed_origins")
        response = await handler(request)
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            if cors:
                response.headers.update(self._cors_headers(origin, preflight=False))
        return response

    def _cors_headers(self, origin: str, preflight: bool) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                   "Access-Control-Expose-Headers": EXPOSED_HEADERS}
        if preflight:
            headers.update({"Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH, OPTIONS",
                            "Access-Control-Allow-Headers": "Authorization, Content-Type",
                            "Access-Control-Max-Age": str(CORS_MAX_AGE_S)})
        return headers

    # ----- WebSockets ------------------------------------------------------------------------------------
    def open_socket(self, address: str) -> None:
        """Count a new WebSocket of ``address``; raises 503 when the server has ``ws_total`` open, 429 when the
        address has ``ws_per_address``."""
        retry = {"Retry-After": str(SOCKET_RETRY_S)}
        if sum(self.sockets.values()) >= self.settings.ws_total:
            raise web.HTTPServiceUnavailable(headers=retry, text=f"the server has {self.settings.ws_total} signaling "
                                                                 "connections open; try again later")
        if self.sockets.get(address, 0) >= self.settings.ws_per_address:
            raise web.HTTPTooManyRequests(headers=retry, text=f"your address already has "
                                                              f"{self.settings.ws_per_address} signaling connections "
                                                              "open; close one first")
        self.sockets[address] = self.sockets.get(address, 0) + 1

    def close_socket(self, address: str) -> None:
        """A WebSocket of ``address`` closed."""
        left = self.sockets.get(address, 0) - 1
        if left > 0:
            self.sockets[address] = left
        else:
            self.sockets.pop(address, None)

    def message_allowed(self, address: str) -> bool:
        """Spend one of ``address``'s WebSocket message tokens; False when it is over the rate."""
        return self.messages.take(address) == 0


GUARD = web.AppKey("guard", Guard)


@web.middleware
async def guard_requests(request: web.Request, handler) -> web.StreamResponse:
    """The application's :class:`Guard` (``app[GUARD]``) checks every request; without one, requests pass."""
    guard = request.app.get(GUARD)
    return await (handler(request) if guard is None else guard.check(request, handler))
