"""Who may do what: the operator's API key and per-session tokens (docs/security.md).

A session token is ``<session id>.<role>.<expiry, unix seconds>.<signature>``: the signature is HMAC-SHA256 over
the first three fields with the server's token secret, base64url without padding. Role ``view`` watches a session
(WHEP, the viewer page); ``control`` also ends it, drives its RTMP push and mints fresh tokens. The API key may do
everything. Credentials arrive as ``Authorization: Bearer …`` (RFC 9725, as OBS sends it) or as ``?token=…`` (the
viewer link, the ``Location`` of WHIP/WHEP resources).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from aiohttp import web

from live.settings import AuthSettings, ConfigError

ROLES = ("view", "control")
CHALLENGE = 'Bearer realm="live-avatar"'
INVALID = 'Bearer realm="live-avatar", error="invalid_token"'


class TokenError(ValueError):
    """A token is malformed, forged or expired; the message says which."""


@dataclass(frozen=True)
class Grant:
    """What a valid token grants: one role on one session until ``expires`` (unix seconds)."""

    session_id: str
    role: str
    expires: int

    def allows(self, session_id: str, role: str) -> bool:
        """Whether this grant covers ``role`` on ``session_id`` (control covers view)."""
        return self.session_id == session_id and (role == "view" or self.role == "control")


def _sign(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def utc(seconds: float) -> str:
    """A unix time as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenSigner:
    """Issues and verifies session tokens with one secret; ``clock`` (unix seconds) is injectable for tests."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        """Sign with ``secret``; tokens live ``ttl_s`` seconds."""
        self._secret = secret
        self.ttl_s = ttl_s
        self.clock = clock

    def issue(self, session_id: str, role: str) -> str:
        """A token granting ``role`` on ``session_id`` for ``ttl_s`` from now."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        payload = f"{session_id}.{role}.{int(self.clock() + self.ttl_s)}"
        return f"{payload}.{_sign(self._secret, payload)}"

    def verify(self, token: str) -> Grant:
        """The grant of a genuine, unexpired token; raises :class:`TokenError` saying what is wrong."""
        parts = token.split(".")
        if len(parts) != 4 or parts[1] not in ROLES or not parts[2].isdigit():
            raise TokenError("the credential is neither the API key nor a session token")
        session_id, role, expires, signature = parts
        if not hmac.compare_digest(signature, _sign(self._secret, f"{session_id}.{role}.{expires}")):
            raise TokenError("the token's signature does not match: it was not issued by this server (or the "
                             "server restarted since; ask the session's talker for a new link)")
        if int(expires) <= self.clock():
            raise TokenError(f"the token expired at {utc(int(expires))}; ask the session's talker for a fresh "
                             "link (or mint one with GET /api/sessions/{id}/tokens)")
        return Grant(session_id, role, int(expires))


def credential(request: web.Request) -> str | None:
    """The caller's credential: the ``Authorization: Bearer`` value, else the ``token`` query parameter."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise web.HTTPUnauthorized(text="send credentials as 'Authorization: Bearer <token or API key>'",
                                       headers={"WWW-Authenticate": CHALLENGE})
        return value.strip()
    return request.query.get("token") or None


class Auth:
    """The server's access rules: an optional API key (none = open admin endpoints, for a loopback bind) and
    session tokens, which every per-session action needs, key or not."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.time) -> None:
        """Rules from ``settings``; without a token secret, a random one for this process."""
        self.settings = settings
        secret = settings.token_secret.encode() if settings.token_secret else secrets.token_bytes(32)
        self.signer = TokenSigner(secret, settings.token_ttl_s, clock)

    @property
    def open(self) -> bool:
        """No API key is configured: admin endpoints are open (the bind is loopback, or ``--insecure``)."""
        return self.settings.api_key is None

    def is_key(self, value: str | None) -> bool:
        """Whether ``value`` is the API key (constant-time)."""
        key = self.settings.api_key
        return key is not None and value is not None and hmac.compare_digest(value.encode(), key.encode())

    def tokens(self, session_id: str) -> dict:
        """Fresh view and control tokens of a session, their expiry and the viewer link carrying the view token."""
        view = self.signer.issue(session_id, "view")
        return {"view_token": view, "control_token": self.signer.issue(session_id, "control"),
                "expires_at": utc(self.signer.clock() + self.signer.ttl_s), "view_url": f"/view/{session_id}?token={view}"}

    def is_admin(self, request: web.Request) -> bool:
        """Whether the caller may use admin endpoints: it presents the API key, or no key is configured."""
        if self.open:
            return True
        try:
            return self.is_key(credential(request))
        except web.HTTPUnauthorized:  # a malformed Authorization header is no key
            return False

    def require_admin(self, request: web.Request, what: str) -> None:
        """Refuse (401/403) a caller without the API key, when one is configured."""
        if self.open or self.is_key(credential(request)):
            return
        if credential(request) is None:
            raise web.HTTPUnauthorized(text=f"{what} needs the API key: send 'Authorization: Bearer <API key>'",
                                       headers={"WWW-Authenticate": CHALLENGE})
        raise web.HTTPForbidden(text=f"{what} needs the API key; a session token does not grant it")

    def require_session(self, request: web.Request, session_id: str, role: str) -> None:
        """Refuse (401/403) a caller without the API key or a token granting ``role`` on ``session_id``."""
        value = credential(request)
        if self.is_key(value):
            return
        needed = "view or control" if role == "view" else "control"
        if value is None:
            raise web.HTTPUnauthorized(text=f"this needs the session's {needed} token (?token=… or 'Authorization: "
                                            "Bearer …'; the talker gets them when the session starts) or the API key",
                                       headers={"WWW-Authenticate": CHALLENGE})
        try:
            grant = self.signer.verify(value)
        except TokenError as exc:
            raise web.HTTPUnauthorized(text=str(exc), headers={"WWW-Authenticate": INVALID}) from None
        if grant.session_id != session_id:
            raise web.HTTPForbidden(text="this token belongs to another session")
        if not grant.allows(session_id, role):
            raise web.HTTPForbidden(text=f"a {grant.role} token cannot do this; it needs the session's control "
                                         "token or the API key")

    def require_publisher(self, key: str | None,
                          how: str = "send 'Authorization: Bearer <API key>' (OBS: the Bearer Token field)") -> None:
        """Refuse (401/403) starting a session when ``publish`` is 'key' and ``key`` is not the API key, or when a
        key is configured and the caller presents a different one (a misconfigured client should hear so); ``how``
        tells the caller how to present the key."""
        if self.is_key(key):
            return
        if self.settings.publish == "key":
            if key is None:
                raise web.HTTPUnauthorized(text=f"starting a session here needs the API key: {how}",
                                           headers={"WWW-Authenticate": CHALLENGE})
            raise web.HTTPForbidden(text="the credential is not this server's API key")
        if key is not None and not self.open:
            raise web.HTTPForbidden(text="the bearer token is not this server's API key; send the right key or none")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, settings: AuthSettings, insecure: bool) -> None:
    """Refuse (``ConfigError``) to serve a non-loopback address without an API key, unless ``insecure``."""
    if settings.api_key is None and not insecure and not is_loopback(host):
        raise ConfigError(f"refusing to serve {host or 'all addresses'} without an API key: anyone who reaches the "
                          "port could read /health and /metrics. Set one (LIVE_AVATAR_SERVER__AUTH__API_KEY=…; "
                          "make it with: python -c 'import secrets; print(secrets.token_urlsafe(32))'), bind "
                          "127.0.0.1, or pass --insecure if a trusted network or proxy guards the port "
                          "(docs/security.md)")
