"""Malformed SDP, JSON, oversized messages and bad uploads get clear errors, and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.server_helpers import AUTH, get_json, offer_sdp


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 150, 120)).save(buf, format="PNG")
    return buf.getvalue()


async def _post(url: str, data: bytes | str, content_type: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=data, headers={"Content-Type": content_type, **(headers or {})}) as resp:
            return resp.status, dict(resp.headers), await resp.json()


@pytest.mark.parametrize(("body", "content_type", "status", "words"), [
    ("v=0\r\n", "text/plain", 415, "application/sdp"),
    ("", "application/sdp", 400, "empty"),
    ("hello world", "application/sdp", 400, "not an SDP offer"),
    ("v=0\r\nm=audio\r\n", "application/sdp", 400, "SDP"),
    ("v=0\r\n" + "a=x-padding:" + "x" * 70_000 + "\r\n", "application/sdp", 413, "larger than"),
])
async def test_whip_rejects_bad_offers_clearly(server_url, body, content_type, status, words):
    got, _, payload = await _post(server_url + "/whip", body, content_type)
    assert got == status
    assert payload["type"] == "error" and words in payload["message"], payload


async def test_whip_reads_an_offer_that_arrives_in_pieces(server_url):
    """The size check sees the whole body even when it comes in several network reads (chunked, with pauses):
    an oversized offer is refused as too large, not as a truncated SDP."""
    async def pieces():
        yield b"v=0\r\na=x-padding:" + b"x" * 30_000
        await asyncio.sleep(0.2)
        yield b"x" * 40_000 + b"\r\n"

    async with aiohttp.ClientSession() as http:
        async with http.post(server_url + "/whip", data=pieces(), headers={"Content-Type": "application/sdp"}) as resp:
            payload = await resp.json()
            assert resp.status == 413, payload
    assert "larger than" in payload["message"]


async def test_whip_offer_without_audio_and_unknown_image_are_refused(server_url):
    status, _, payload = await _post(server_url + "/whip", await offer_sdp(("video",)), "application/sdp")
    assert status == 400 and "no audio" in payload["message"]
    status, _, payload = await _post(server_url + "/whip?image=nope", await offer_sdp(("audio",)), "application/sdp")
    assert status == 400 and "unknown image" in payload["message"]


async def test_whep_errors(server_url):
    status, _, payload = await _post(server_url + "/whep/no-such-session", await offer_sdp(("video",)),
                                     "application/sdp", AUTH)
    assert status == 404 and "no session" in payload["message"]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.delete(server_url + "/whep/no-such-session/viewer") as resp:
            assert resp.status == 404
        async with http.delete(server_url + "/whip/no-such-session") as resp:
            assert resp.status == 404
        async with http.patch(server_url + "/whip/anything", data="a=candidate:1",
                              headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as resp:
            assert resp.status == 405 and "trickle" in (await resp.json())["message"]


@pytest.mark.parametrize(("data", "content_type", "status", "words"), [
    (b"not an image at all", "image/png", 400, "not an image"),
    (b"GIF89a" + b"\0" * 64, "image/gif", 400, "not an image"),
    (None, "image/png", 400, "larger than 4096"),
    (b"\0" * (10 * 1024 * 1024 + 1), "image/png", 413, "limit"),
    (b"{}", "application/json", 415, "Content-Type image"),
])
async def test_bad_uploads_are_refused_clearly(server_url, data, content_type, status, words):
    body = _png(4100, 8) if data is None else data
    got, _, payload = await _post(server_url + "/api/images", body, content_type)
    assert got == status, payload
    assert payload["type"] == "error" and words in payload["message"], payload


async def test_good_upload_is_accepted_and_usable(server_url):
    status, _, payload = await _post(server_url + "/api/images", _png(320, 240), "image/png")
    assert status == 201 and payload["width"] == 320 and payload["height"] == 240
    # The tiny test profile animates only its built-in characters: the upload says so instead of a silent blob.
    assert "built-in characters" in payload["warning"] and "liveavatar-14b" in payload["warning"]
    status, headers, _ = await _post_sdp(server_url + f"/whip?image={payload['image_id']}&prompt=waving",
                                         await offer_sdp(("audio",)))
    assert status == 201
    session_id = urlsplit(headers["Location"]).path.rsplit("/", 1)[-1]
    session = next(s for s in (await get_json(server_url + "/health"))["sessions"] if s["id"] == session_id)
    assert session["image"] == "upload" and session["prompt"] == "waving"
    async with aiohttp.ClientSession() as http:
        async with http.delete(server_url + headers["Location"]) as resp:
            assert resp.status == 200


async def test_uploads_are_read_whole_however_they_arrive(server_url):
    """A 3 MB photo sent in pieces with pauses is read whole (one read returns only what has arrived); a 12 MB
    chunked upload, whose size no header declares, is refused as too large."""
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), np.uint8)
    photo = io.BytesIO()
    Image.fromarray(noise).save(photo, format="PNG")
    data = photo.getvalue()
    assert len(data) > 2_000_000

    async def pieces(body: bytes, size: int):
        for start in range(0, len(body), size):
            yield body[start:start + size]
            await asyncio.sleep(0.01)

    status, _, payload = await _post(server_url + "/api/images", pieces(data, 256 * 1024), "image/png")
    assert status == 201 and (payload["width"], payload["height"]) == (1000, 1000), payload
    status, _, payload = await _post(server_url + "/api/images", pieces(b"\0" * 12 * 1024 * 1024, 1024 * 1024),
                                     "image/png")
    assert status == 413 and "10485760-byte limit" in payload["message"], payload


async def _post_sdp(url: str, sdp: str) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=sdp, headers={"Content-Type": "application/sdp"}) as resp:
            return resp.status, dict(resp.headers), await resp.text()


async def test_websocket_reports_bad_messages_and_stays_open(server_url):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(server_url + "/ws") as ws:
            cases = [
                ("{not json", "not valid JSON"),
                ("[1, 2]", '"type" field'),
                (json.dumps({"type": "dance"}), "unknown message type"),
                (json.dumps({"type": "offer"}), "invalid offer message: sdp"),
                (json.dumps({"type": "offer", "sdp": "garbage"}), "not an SDP offer"),
                (json.dumps({"type": "offer", "sdp": await offer_sdp(("audio",))}), "no video"),
                (json.dumps({"type": "offer", "sdp": await offer_sdp(("audio", "video")), "image": "nope"}),
                 "unknown image"),
                (json.dumps({"type": "prompt", "prompt": "smile"}), "no session yet"),
                (json.dumps({"type": "candidate", "candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"}),
                 "no session yet"),
                (json.dumps({"type": "prompt", "prompt": "x" * 2000}), "invalid prompt message"),
                (json.dumps({"type": "offer", "sdp": "v=0" + "x" * 200_000}), "larger than"),
            ]
            for text, words in cases:
                await ws.send_str(text)
                reply = await ws.receive_json(timeout=30)
                assert reply["type"] == "error" and words in reply["message"], (text[:60], reply)
            await ws.send_bytes(b"\x00\x01")
            reply = await ws.receive_json(timeout=30)
            assert "binary" in reply["message"]
            # Beyond the protocol limit the socket is closed with 1009 (message too big). The server may close it
            # while the client is still writing the 2 MB, so the send itself may see the connection go.
            with contextlib.suppress(ConnectionError):
                await ws.send_str("x" * (2 * 1024 * 1024))
            closing = await ws.receive(timeout=30)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1009
    health = await get_json(server_url + "/health")
    assert health["status"] == "ok" and health["sessions"] == []
