"""Helpers shared by the live-server tests: the test server's credentials, SDP offers, polling /health and /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from cli.client import new_peer

# The shared test server (tests/conftest.py `server_url`) runs with this API key and token secret.
API_KEY = "test-operator-key-0123456789"
TOKEN_SECRET = "test-token-secret-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def offer_sdp(kinds: tuple[str, ...]) -> str:
    """A real aiortc offer with one section per kind in ``kinds`` (audio sendrecv, video recvonly)."""
    pc = new_peer()
    for kind in kinds:
        pc.addTransceiver(kind, direction="sendrecv" if kind == "audio" else "recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def get_json(url: str, headers: dict[str, str] = AUTH) -> dict:
    """GET a JSON document (as the operator, by default: a server without a key ignores it)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            return await resp.json()


async def get_text(url: str, headers: dict[str, str] = AUTH) -> str:
    """GET a text document (as the operator, by default)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            return await resp.text()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.25) -> float:
    """Poll ``check`` until it is true; returns the seconds it took, fails the test after ``timeout``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def session_ids(server_url: str) -> list[str]:
    """Ids of the sessions /health lists."""
    return [s["id"] for s in (await get_json(server_url + "/health"))["sessions"]]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
