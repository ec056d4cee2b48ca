"""Authentication and browser safety: the API key, per-session view/control tokens (and their expiry), OBS-style
``Authorization: Bearer`` on WHIP, the open loopback mode, Host/Origin/content-type checks and per-address limits."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from cli.client import WhipPublisher, new_peer
from live.settings import AuthSettings, ConfigError, GuardSettings, load_settings
from signaling.auth import Auth, TokenError, TokenSigner, check_exposure
from signaling.guard import Guard, RateLimiter, TokenBucket
from tests.conftest import make_speechlike
from tests.server_helpers import API_KEY, AUTH, TOKEN_SECRET, get_json, offer_sdp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


async def _request(method: str, url: str, headers: dict | None = None, **kwargs) -> tuple[int, dict, dict | str]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, dict(resp.headers), body


# ----- tokens and rules, in process ------------------------------------------------------------------------
def test_tokens_are_signed_scoped_and_expire():
    now = [1_000_000.0]
    signer = TokenSigner(b"s" * 32, ttl_s=60, clock=lambda: now[0])
    view, control = signer.issue("abc", "view"), signer.issue("abc", "control")
    assert view.startswith("abc.view.1000060.")
    grant = signer.verify(view)
    assert (grant.session_id, grant.role, grant.expires) == ("abc", "view", 1_000_060)
    assert grant.allows("abc", "view") and not grant.allows("abc", "control") and not grant.allows("other", "view")
    assert signer.verify(control).allows("abc", "view")
    for forged in (view.replace(".view.", ".control."), view.replace("abc.", "abd."), view[:-2] + "xx",
                   TokenSigner(b"t" * 32, 60, lambda: now[0]).issue("abc", "view")):
        with pytest.raises(TokenError, match="signature"):
            signer.verify(forged)
    for junk in ("", "abc", "a.b.c.d", "abc.view.soon.sig", "abc.admin.1.sig"):
        with pytest.raises(TokenError, match="neither the API key nor a session token"):
            signer.verify(junk)
    now[0] += 61
    with pytest.raises(TokenError, match="expired at 1970-01-12T13:47:40Z"):
        signer.verify(view)


def refused(kind: type[web.HTTPException], words: str, call, *args) -> None:
    """``call(*args)`` raises ``kind`` whose text has ``words``."""
    with pytest.raises(kind) as err:
        call(*args)
    assert words in err.value.text, err.value.text


def _request_with(token: str | None = None, header: str | None = None) -> web.Request:
    headers = {"Authorization": header} if header else {}
    return make_mocked_request("GET", "/x" + (f"?token={token}" if token else ""), headers=headers)


def test_open_mode_opens_admin_endpoints_but_sessions_still_need_their_tokens():
    auth = Auth(AuthSettings())
    assert auth.open and auth.is_admin(_request_with())
    refused(web.HTTPUnauthorized, "view or control token", auth.require_session, _request_with(), "abc", "view")
    auth.require_session(_request_with(auth.signer.issue("abc", "view")), "abc", "view")
    refused(web.HTTPForbidden, "another session", auth.require_session,
            _request_with(auth.signer.issue("other", "control")), "abc", "view")
    auth.require_publisher(None)
    auth.require_publisher("whatever OBS was configured with")


def test_keyed_mode_rules():
    auth = Auth(AuthSettings(api_key=API_KEY))
    assert not auth.open and not auth.is_admin(_request_with()) and auth.is_admin(_request_with(header=AUTH["Authorization"]))
    auth.require_session(_request_with(API_KEY), "any", "control")
    refused(web.HTTPForbidden, "needs the API key", auth.require_admin,
            _request_with(auth.signer.issue("abc", "control")), "/metrics")
    refused(web.HTTPUnauthorized, "Authorization: Bearer", auth.require_session,
            _request_with(header="Basic dXNlcjpwdw=="), "abc", "view")
    refused(web.HTTPForbidden, "a view token cannot", auth.require_session,
            _request_with(auth.signer.issue("abc", "view")), "abc", "control")
    auth.require_publisher(None)
    refused(web.HTTPForbidden, "not this server's API key", auth.require_publisher, "wrong-key-wrong-key")
    strict = Auth(AuthSettings(api_key=API_KEY, publish="key"))
    refused(web.HTTPUnauthorized, "needs the API key", strict.require_publisher, None)
    strict.require_publisher(API_KEY)


def test_settings_and_exposure_checks(monkeypatch):
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings("configs/tiny.yaml", server={"auth": {"api_key": "short"}})
    with pytest.raises(ConfigError, match="publish: 'key' needs an api_key"):
        load_settings("configs/tiny.yaml", server={"auth": {"publish": "key"}})
    with pytest.raises(ConfigError, match="is not an origin"):
        load_settings("configs/tiny.yaml", server={"guard": {"allowed_origins": ["https://a.example/path"]}})
    monkeypatch.setenv("LIVE_AVATAR_SERVER__AUTH__API_KEY", API_KEY)
    assert load_settings("configs/tiny.yaml").server.auth.api_key == API_KEY
    assert API_KEY not in repr(load_settings("configs/tiny.yaml"))
    open_auth = AuthSettings()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, open_auth, insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "avatar.example.org"):
        with pytest.raises(ConfigError, match="refusing to serve"):
            check_exposure(host, open_auth, insecure=False)
        check_exposure(host, open_auth, insecure=True)
        check_exposure(host, AuthSettings(api_key=API_KEY), insecure=False)


def test_serving_a_public_address_without_a_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_AVATAR_")}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve 0.0.0.0 without an API key" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----- guard, in process -----------------------------------------------------------------------------------
def test_token_buckets_and_socket_caps():
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [0, 0, 0, 0.5]
    now[0] += 0.5
    assert bucket.take() == 0 and bucket.take() == 0.5
    limiter = RateLimiter(rate=1, burst=1, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") > 0 and limiter.take("b") == 0
    guard = Guard(GuardSettings(ws_per_address=2, ws_total=3), "127.0.0.1")
    guard.open_socket("a")
    guard.open_socket("a")
    refused(web.HTTPTooManyRequests, "2 signaling connections", guard.open_socket, "a")
    guard.open_socket("b")
    refused(web.HTTPServiceUnavailable, "3 signaling connections", guard.open_socket, "c")
    guard.close_socket("a")
    guard.open_socket("c")


def test_host_and_origin_rules():
    guard = Guard(GuardSettings(allowed_hosts=["avatar.example.org", "*.studio.example"],
                                allowed_origins=["https://app.example"]), "0.0.0.0")
    for host in ("127.0.0.1", "localhost", "192.168.1.5", "::1", "avatar.example.org", "a.studio.example", ""):
        assert guard.host_allowed(host), host
    for host in ("evil.example", "studio.example.evil", "avatar.example.org.evil"):
        assert not guard.host_allowed(host), host

    def req(host: str) -> web.Request:
        return make_mocked_request("POST", "/ws", headers={"Host": host})

    assert guard.origin_allowed("http://localhost:8080", req("localhost:8080"))
    assert guard.origin_allowed("https://avatar.example.org", req("avatar.example.org"))  # behind a TLS proxy
    assert guard.origin_allowed("https://app.example", req("localhost:8080"))
    for origin in ("http://localhost:3000", "http://evil.example", "null", "http://localhost:99999"):
        assert not guard.origin_allowed(origin, req("localhost:8080")), origin
    proxied = Guard(GuardSettings(trusted_proxies=["127.0.0.1", "10.0.0.2"]), "127.0.0.1")
    hops = {"X-Forwarded-For": "203.0.113.9, 198.51.100.2, 10.0.0.2"}
    via_proxy = make_mocked_request("GET", "/", headers=hops).clone(remote="127.0.0.1")
    assert proxied.client_address(via_proxy) == "198.51.100.2"  # the last hop no trusted proxy added
    direct = make_mocked_request("GET", "/", headers=hops).clone(remote="192.0.2.7")
    assert proxied.client_address(direct) == "192.0.2.7"  # a client cannot choose its address


async def test_cors_only_for_configured_origins():
    from aiohttp.test_utils import TestClient, TestServer

    from signaling.guard import GUARD, guard_requests
    from signaling.http import json_errors

    app = web.Application(middlewares=[guard_requests, json_errors])
    app[GUARD] = Guard(GuardSettings(cors_origins=["https://player.example"], http_rate=1, http_burst=4), "127.0.0.1")
    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201, headers={"Location": "/whip/x"})

    app.router.add_post("/whip", created)
    async with TestClient(TestServer(app)) as client:
        resp = await client.options("/whip", headers={"Origin": "https://player.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://player.example"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        resp = await client.post("/whip", headers={"Origin": "https://player.example"})
        assert resp.status == 201 and "Location" in resp.headers["Access-Control-Expose-Headers"]
        resp = await client.post("/whip", headers={"Origin": "https://evil.example"})
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        assert "allowed_origins" in (await resp.json())["message"]
        resp = await client.post("/whip")
        assert resp.status == 201 and "Access-Control-Allow-Origin" not in resp.headers
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = await client.post("/whip")
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert "too many requests" in (await resp.json())["message"]


# ----- a real server with an API key -----------------------------------------------------------------------
@pytest.fixture
async def whip_session(server_url):
    """A WHIP session published OBS-style with the API key as bearer; yields (publisher, control token)."""
    publisher = WhipPublisher(server_url, make_speechlike(60.0), token=API_KEY)
    await publisher.start()
    control = parse_qs(urlsplit(publisher.location).query)["token"][0]
    try:
        yield publisher, control
    finally:
        await publisher.stop()


async def test_without_a_token_session_actions_and_listing_are_refused(server_url, whip_session):
    publisher, control = whip_session
    sid = publisher.session_id
    rtmp = f"{server_url}/api/sessions/{sid}/rtmp"
    sdp = await offer_sdp(("video",))
    refusals = [
        ("POST", f"{server_url}/whep/{sid}", {"data": sdp, "headers": {"Content-Type": "application/sdp"}}),
        ("DELETE", f"{server_url}/whip/{sid}", {}),
        ("DELETE", f"{server_url}/whep/{sid}/someviewer", {}),
        ("GET", rtmp, {}),
        ("POST", rtmp, {"json": {"url": "rtmp://127.0.0.1/live/x"}}),
        ("DELETE", rtmp, {}),
        ("GET", f"{server_url}/api/sessions/{sid}/tokens", {}),
        ("GET", f"{server_url}/metrics", {}),
    ]
    for method, url, kwargs in refusals:
        status, headers, body = await _request(method, url, **kwargs)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (method, url, status, body)
        assert body["type"] == "error" and ("token" in body["message"] or "API key" in body["message"]), body
    anonymous = await get_json(server_url + "/health", headers={})
    assert "sessions" not in anonymous and anonymous["session_count"] >= 1 and sid not in json.dumps(anonymous)
    assert sid in [s["id"] for s in (await get_json(server_url + "/health"))["sessions"]]


async def test_tokens_grant_their_role_on_their_session_only(server_url, whip_session):
    publisher, control = whip_session
    sid = publisher.session_id
    view = publisher.view_token
    assert view.startswith(f"{sid}.view.")
    rtmp = f"{server_url}/api/sessions/{sid}/rtmp"
    other = TokenSigner(TOKEN_SECRET.encode(), 60).issue("another-session", "control")
    expired = TokenSigner(TOKEN_SECRET.encode(), 60, clock=lambda: time.time() - 3600).issue(sid, "control")
    forged = TokenSigner(b"not-the-secret" * 3, 60).issue(sid, "control")
    for token, status, words in [(view, 403, "view token cannot"), (other, 403, "another session"),
                                 (expired, 401, "expired"), (forged, 401, "signature"), (API_KEY + "x", 401, "neither")]:
        got, _, body = await _request("GET", rtmp, bearer(token))
        assert got == status and words in body["message"], (token, got, body)
    # A view token (header or ?token=) watches; the viewer resource's Location carries what deletes it.
    sdp = await offer_sdp(("audio", "video"))
    for headers, url in [(bearer(view), f"{server_url}/whep/{sid}"), ({}, f"{server_url}/whep/{sid}?token={view}")]:
        status, resp_headers, body = await _request("POST", url, {"Content-Type": "application/sdp", **headers},
                                                    data=sdp)
        assert status == 201 and "?token=" in resp_headers["Location"], body
        assert (await _request("DELETE", server_url + resp_headers["Location"]))[0] == 200
    # The control token drives RTMP and mints fresh tokens; plain text is refused (no CORS preflight dodge).
    assert (await _request("GET", rtmp, bearer(control)))[2] == {"rtmp": None}
    status, _, body = await _request("POST", rtmp, {**bearer(control), "Content-Type": "text/plain"},
                                     data='{"url": "rtmp://127.0.0.1/live/x"}')
    assert status == 415 and "application/json" in body["message"]
    status, _, fresh = await _request("GET", f"{server_url}/api/sessions/{sid}/tokens?token={control}")
    assert status == 200 and fresh["view_url"] == f"/view/{sid}?token={fresh['view_token']}"
    assert (await _request("GET", rtmp, bearer(fresh["control_token"])))[0] == 200
    # The API key may do everything, including ending the session.
    assert (await _request("GET", f"{server_url}/metrics", AUTH))[0] == 200


async def test_whip_bearer_must_be_the_key_and_delete_needs_control(server_url):
    status, _, body = await _request("POST", server_url + "/whip",
                                     {"Content-Type": "application/sdp", **bearer("obs-typo-obs-typo-obs")},
                                     data=await offer_sdp(("audio",)))
    assert status == 403 and "not this server's API key" in body["message"]
    publisher = WhipPublisher(server_url, make_speechlike(30.0))
    await publisher.start()
    try:
        sid = publisher.session_id
        assert (await _request("DELETE", f"{server_url}/whip/{sid}?token={publisher.view_token}"))[0] == 403
    finally:
        assert await publisher.stop() == 200  # the Location's control token


async def test_talker_gets_its_tokens_in_the_answer(server_url):
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(server_url + "/ws") as ws:
            await ws.send_json({"type": "offer", "sdp": pc.localDescription.sdp})
            answer = await _next(ws, "answer")
            sid = answer["session_id"]
            assert answer["view_url"] == f"/view/{sid}?token={answer['view_token']}"
            assert answer["control_token"].startswith(f"{sid}.control.") and answer["expires_at"].endswith("Z")
            status, _, _ = await _request("GET", f"{server_url}/api/sessions/{sid}/rtmp",
                                          bearer(answer["control_token"]))
            assert status == 200
            await ws.send_json({"type": "bye"})
            await _next(ws, "ended")
    finally:
        await pc.close()


async def test_host_origin_and_per_address_limits(server_url):
    port = urlsplit(server_url).port
    status, _, body = await _request("GET", server_url + "/health", {"Host": f"evil.example:{port}"})
    assert status == 400 and "allowed_hosts" in body["message"]
    assert (await _request("GET", server_url + "/health", {"Host": f"localhost:{port}"}))[0] == 200
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server_url + "/ws", origin="http://evil.example")
        assert refused.value.status == 403
        async with http.ws_connect(server_url + "/ws", origin=f"http://127.0.0.1:{port}") as ws:
            await ws.send_str("[]")
            assert (await ws.receive_json(timeout=10))["type"] == "error"
        status, _, body = await _request("POST", server_url + "/api/images", {"Origin": "http://evil.example",
                                                                                "Content-Type": "image/png"}, data=b"x")
        assert status == 403 and "evil.example" in body["message"]
        # Signaling sockets per address are capped, and a message flood closes the socket (policy violation).
        sockets = [await http.ws_connect(server_url + "/ws") for _ in range(GuardSettings().ws_per_address)]
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as capped:
                await http.ws_connect(server_url + "/ws")
            assert capped.value.status == 429
            flooded = sockets[0]
            for _ in range(GuardSettings().ws_burst + 10):
                await flooded.send_str('{"type": "dance"}')
            while (await flooded.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert flooded.close_code == 1008
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
    await asyncio.sleep(GuardSettings().ws_burst / GuardSettings().ws_rate)  # let the message bucket refill


async def _next(ws, kind: str) -> dict:
    while True:
        msg = await ws.receive_json(timeout=60)
        if msg["type"] == kind:
            return msg
