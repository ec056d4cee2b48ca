"""``server.ice_servers``: parsing and validation, aiortc peers that gather through them (a STUN responder on
loopback, a TURN server that refuses, a STUN server that never answers), and a real server handing them to its
pages and to the bundled client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import yaml
from aioice import stun
from aiortc import RTCSessionDescription

from cli.client import WhipPublisher, new_peer, parse_ice_server
from cli.main import build_parser
from live.peer import PeerLink, rtc_configuration
from live.settings import ConfigError, IceServer, load_settings
from tests.browser_helpers import NEEDS_CHROMIUM, launch_browser
from tests.conftest import ARTIFACTS, make_speechlike
from tests.server_helpers import get_json

TURN = {"urls": ["turn:turn.example.org:3478?transport=tcp"], "username": "u", "credential": "secret"}


def unused_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A loopback port nothing listens on (UDP: requests go unanswered; TCP: connections are refused)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stun_port() -> Iterator[int]:
    """A minimal STUN server on loopback: answers every Binding request with the sender's address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                continue
            try:
                request = stun.parse_message(data)
            except ValueError:
                continue
            response = stun.Message(message_method=request.message_method, message_class=stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
            response.attributes["XOR-MAPPED-ADDRESS"] = addr
            sock.sendto(bytes(response), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    done.set()
    thread.join(5)
    sock.close()


def reachable_servers(stun_port: int) -> list[IceServer]:
    """The loopback STUN responder, and a TURN server over TCP that refuses at once (so gathering does not wait)."""
    return [IceServer.model_validate(f"stun:127.0.0.1:{stun_port}"),
            IceServer(urls=[f"turn:127.0.0.1:{unused_port(socket.SOCK_STREAM)}?transport=tcp"], username="u",
                      credential="p")]


# ----- settings ----------------------------------------------------------------------------------------------
def test_no_ice_servers_by_default() -> None:
    assert load_settings("configs/tiny.yaml").server.ice_servers == []
    assert rtc_configuration().iceServers == []


def test_ice_servers_come_from_the_profile_and_the_environment(tmp_path, monkeypatch) -> None:
    data = load_settings("configs/tiny.yaml").model_dump(mode="json", exclude={"source"})
    data["server"]["ice_servers"] = ["stun:stun.example.org", TURN]
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(data))
    servers = load_settings(profile).server.ice_servers
    assert [s.for_browser() for s in servers] == [{"urls": ["stun:stun.example.org"]}, TURN]
    config = rtc_configuration(servers)
    assert [(s.urls, s.username, s.credential) for s in config.iceServers] == [
        (["stun:stun.example.org"], None, None), (TURN["urls"], "u", "secret")]

    monkeypatch.setenv("LIVE_AVATAR_SERVER__ICE_SERVERS", json.dumps([{"urls": "stuns:[2001:db8::1]:5349"}]))
    monkeypatch.setenv("LIVE_AVATAR_SERVER__PORT", "9000")
    env = load_settings(profile).server
    assert env.port == 9000
    assert [s.urls for s in env.ice_servers] == [["stuns:[2001:db8::1]:5349"]]


@pytest.mark.parametrize(("entry", "complaint"), [
    ("stun.example.org", "is not a STUN/TURN URL"),
    ("https://turn.example.org", "is not a STUN/TURN URL"),
    ("stun:", "is not a STUN/TURN URL"),
    ("stun:bad host", "is not a STUN/TURN URL"),
    ("stun:stun.example.org:70000", "port 70000 is outside 1-65535"),
    ("stun:stun.example.org?transport=udp", "only turn: and turns: URLs take ?transport="),
    ({"urls": "turn:turn.example.org"}, "needs a username and a credential"),
    ({"urls": []}, "at least 1 item"),
    ({"urls": "stun:stun.example.org", "password": "x"}, "Extra inputs are not permitted"),
])
def test_a_malformed_ice_server_is_a_config_error_naming_the_setting(entry, complaint) -> None:
    with pytest.raises(ConfigError, match="server.ice_servers.0") as err:
        load_settings("configs/tiny.yaml", server={"ice_servers": [entry]})
    assert complaint in str(err.value)


def test_a_malformed_ice_server_in_the_environment_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("LIVE_AVATAR_SERVER__ICE_SERVERS", '["stun:stun.example.org", "turn:"]')
    with pytest.raises(ConfigError, match=r"(?s)server\.ice_servers\.1.*'turn:' is not a STUN/TURN URL.*"
                                          r"LIVE_AVATAR_SERVER__ICE_SERVERS"):
        load_settings("configs/tiny.yaml")


def test_turn_credentials_are_minted_from_the_secret_shared_with_coturn() -> None:
    """coturn's use-auth-secret (TURN REST API): username '<expiry>:<name>', credential
    base64(HMAC-SHA1(static-auth-secret, username)); the pages, the client and the server's own peers get fresh ones."""
    server = IceServer(urls=["turn:turn.example.org:3478"], secret="coturn-static-auth-secret", ttl_s=600)
    minted = server.with_credentials(now=1_000_000)
    assert minted.username == "1000600:live-avatar" and minted.secret is None
    digest = hmac.new(b"coturn-static-auth-secret", b"1000600:live-avatar", hashlib.sha1).digest()
    assert minted.credential == base64.b64encode(digest).decode()
    assert rtc_configuration([minted]).iceServers[0].credential == minted.credential
    page = server.for_browser()
    assert set(page) == {"urls", "username", "credential"}
    assert time.time() + 590 < int(page["username"].split(":")[0]) <= time.time() + 601
    assert "coturn-static-auth-secret" not in repr(server)
    named = IceServer(urls=["turns:turn.example.org"], username="studio", secret="s" * 16).with_credentials(now=0)
    assert named.username == "86400:studio"
    for entry, complaint in [({"urls": "stun:s.example.org", "secret": "x"}, "give it to turn:/turns: URLs"),
                             ({"urls": "turn:t.example.org", "secret": "x", "credential": "c"}, "without a credential")]:
        with pytest.raises(ConfigError, match=complaint):
            load_settings("configs/tiny.yaml", server={"ice_servers": [entry]})


def test_the_client_takes_ice_servers_as_urls_or_json(capsys) -> None:
    assert parse_ice_server("stun:127.0.0.1:3478").urls == ["stun:127.0.0.1:3478"]
    assert parse_ice_server(json.dumps(TURN)).for_browser() == TURN
    args = build_parser().parse_args(["client", "--server", "x", "--audio", "a.wav", "--out", "b.mp4",
                                      "--ice-server", "stun:a.example.org", "--ice-server", json.dumps(TURN)])
    assert [s.for_browser() for s in args.ice_server] == [{"urls": ["stun:a.example.org"]}, TURN]
    assert build_parser().parse_args(["client", "--server", "x", "--audio", "a", "--out", "b"]).ice_server is None
    for bad, complaint in [("turn:t.example.org", "needs a username and a credential"),
                           ('{"urls": ', "neither a STUN/TURN URL nor a JSON object")]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["client", "--server", "x", "--audio", "a", "--out", "b", "--ice-server", bad])
        assert exit_.value.code == 2
        assert complaint in capsys.readouterr().err


# ----- aiortc peers ------------------------------------------------------------------------------------------
async def _connect(link: PeerLink, ice_servers: list[IceServer]) -> tuple[str, str, float, float]:
    """A loopback call from a client peer (using ``ice_servers``) to ``link``: the offer, the answer, the seconds
    the answer took and the seconds until both ends were connected."""
    pc = new_peer(ice_servers)
    pc.addTransceiver("audio", direction="recvonly")
    try:
        start = time.monotonic()
        await pc.setLocalDescription(await pc.createOffer())
        asked = time.monotonic()
        answer = await link.answer(pc.localDescription.sdp)
        answered = time.monotonic() - asked
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        while not (pc.connectionState == link.pc.connectionState == "connected"):
            assert "failed" not in (pc.connectionState, link.pc.connectionState)
            await asyncio.sleep(0.02)
        return pc.localDescription.sdp, answer, answered, time.monotonic() - start
    finally:
        await pc.close()
        await link.close()


async def test_a_loopback_call_gathers_through_the_configured_servers(stun_port) -> None:
    servers = reachable_servers(stun_port)
    link = PeerLink("viewer", lambda lk, reason: None, servers)
    offer, answer, answered, _ = await asyncio.wait_for(_connect(link, servers), 20)
    # Both ends asked the STUN responder; the refusing TURN server held nothing up (a silent one would take 5 s).
    assert "typ srflx" in offer and "typ srflx" in answer
    assert answered < 3.0


async def test_an_unreachable_stun_server_delays_the_answer_but_the_call_connects() -> None:
    link = PeerLink("viewer", lambda lk, reason: None, [IceServer.model_validate(f"stun:127.0.0.1:{unused_port()}")])
    _, answer, answered, took = await asyncio.wait_for(_connect(link, []), 30)
    # aioice gives up on the server after 5 s; the host candidates carry the call.
    assert "typ srflx" not in answer and "typ host" in answer
    assert 4.0 < answered < 8.0 and took < 12.0


# ----- a real server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ice_server_url(stun_port) -> Iterator[tuple[str, list[dict]]]:
    """A server (tiny profile) configured with the loopback STUN responder and a refusing TURN server; yields its
    URL and the servers as pages should receive them."""
    from cli.server_process import ServerProcess

    servers = reachable_servers(stun_port)
    settings = load_settings("configs/tiny.yaml")
    settings = settings.model_copy(update={
        "server": settings.server.model_copy(update={"ice_servers": servers, "max_sessions": 1}),
        "video": settings.video.model_copy(update={"size_area": "64*64"})})
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "server-ice.log", "w") as log, ServerProcess(settings, log=log) as url:
        yield url, [s.for_browser() for s in servers]


async def test_the_server_hands_its_ice_servers_to_the_client(ice_server_url) -> None:
    url, expected = ice_server_url
    assert await get_json(url + "/api/config") == {"ice_servers": expected, "publish_needs_key": False}
    publisher = WhipPublisher(url, make_speechlike(2.0))
    await asyncio.wait_for(publisher.start(), 60)
    try:
        # Both ends gathered through the server's STUN responder: the client learned it from /api/config.
        assert "typ srflx" in publisher.pc.localDescription.sdp
        assert "typ srflx" in publisher.pc.remoteDescription.sdp
    finally:
        assert await publisher.stop() == 200


RECORD_CONFIGS = """(() => {
  const Native = window.RTCPeerConnection;
  window.iceConfigs = [];
  window.RTCPeerConnection = function (config) { window.iceConfigs.push(config); return new Native(config); };
  window.RTCPeerConnection.prototype = Native.prototype;
})()"""


@pytest.mark.browser
@NEEDS_CHROMIUM
async def test_the_talk_and_viewer_pages_use_the_servers_ice_servers(ice_server_url, speech_wav) -> None:
    from playwright.async_api import async_playwright

    url, expected = ice_server_url
    async with async_playwright() as p:
        browser = await launch_browser(p, speech_wav)
        try:
            page = await browser.new_page()
            await page.add_init_script(RECORD_CONFIGS)
            await page.goto(f"{url}/view/no-such-session?quiet=1&token=none")
            await page.wait_for_function("window.iceConfigs.length > 0", timeout=30_000)
            assert await page.evaluate("window.iceConfigs[0]") == {"iceServers": expected}

            await page.goto(url + "/")
            await page.click("#start")
            await page.wait_for_function("window.iceConfigs.length > 0", timeout=30_000)
            assert await page.evaluate("window.iceConfigs[0]") == {"iceServers": expected}
            await page.click("#stop")
        finally:
            await browser.close()
