"""TURN credentials minted from a coturn ``use-auth-secret`` secret (``IceServer.with_credentials``), checked against
Debian's real coturn (``turnserver``) on loopback through aioice's TURN client: the right secret gets an allocation,
a wrong secret and expired credentials are refused."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

from live.settings import IceServer

pytestmark = pytest.mark.skipif(shutil.which("turnserver") is None,
                                reason="coturn's turnserver is not installed (apt-get install coturn)")

HOST = "127.0.0.1"
REALM = "live-avatar.test"


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def stun_answers(port: int) -> bool:
    """Whether a STUN binding request over UDP gets an answer."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.2)
        udp.sendto(bytes(request), (HOST, port))
        try:
            return stun.parse_message(udp.recv(2048)).transaction_id == request.transaction_id
        except (OSError, ValueError):
            return False


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A foreground ``turnserver`` with ``use-auth-secret`` on a free loopback port: (port, secret)."""
    tmp: Path = tmp_path_factory.mktemp("coturn")
    port, secret = free_port(), secrets.token_urlsafe(32)
    log = (tmp / "turnserver.log").open("wb")
    proc = subprocess.Popen(
        ["turnserver", f"--listening-port={port}", f"--listening-ip={HOST}", f"--relay-ip={HOST}",
         "--use-auth-secret", f"--static-auth-secret={secret}", f"--realm={REALM}", "--no-tls", "--no-dtls",
         "--allow-loopback-peers", "--no-cli", "--log-file=stdout", "--simple-log",
         f"--userdb={tmp / 'turndb'}", f"--pidfile={tmp / 'turnserver.pid'}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not stun_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"turnserver did not come up (exit {proc.poll()}):\n"
                            f"{(tmp / 'turnserver.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield port, secret
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def minted(secret: str, now: float | None = None) -> IceServer:
    return IceServer(urls=[f"turn:{HOST}"], secret=secret, ttl_s=600).with_credentials(now=now)


async def allocate(port: int, server: IceServer) -> tuple[str, int]:
    """The relayed address coturn allocates for ``server``'s credentials."""
    transport, _ = await asyncio.wait_for(create_turn_endpoint(
        asyncio.DatagramProtocol, server_addr=(HOST, port), username=server.username, password=server.credential,
        lifetime=60, transport="udp"), timeout=5)
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()
        await asyncio.sleep(0.05)  # let the allocation's deletion go out


async def test_minted_credentials_get_an_allocation(coturn: tuple[int, str]) -> None:
    port, secret = coturn
    server = minted(secret)
    assert server.username is not None and server.username.endswith(":live-avatar")
    relayed = await allocate(port, server)
    assert relayed[0] == HOST and 0 < relayed[1] < 65536


async def test_wrong_secret_is_refused(coturn: tuple[int, str]) -> None:
    port, secret = coturn
    with pytest.raises(stun.TransactionFailed) as refused:
        await allocate(port, minted(secret + "-wrong"))
    assert refused.value.response.attributes["ERROR-CODE"][0] == 401


async def test_expired_credentials_are_refused(coturn: tuple[int, str]) -> None:
    port, secret = coturn
    server = minted(secret, now=time.time() - 3600)  # expired 50 minutes ago
    assert int(server.username.split(":")[0]) < time.time()
    with pytest.raises(stun.TransactionFailed) as refused:
        await allocate(port, server)
    assert refused.value.response.attributes["ERROR-CODE"][0] == 401
