"""Hostile input against the real server while a session streams: malformed SDP, JSON, WebSocket frames, images
(decompression bombs included), URLs, headers and raw HTTP. Every one gets a 4xx (or an ``error`` message) that
says what is wrong; no 500, no traceback in the server log, the session keeps its frames coming and a refused
offer holds no admission slot.

The corpus is paced just under the server's per-address limits (``server.guard``), so it reaches the handlers
instead of the rate limiter.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import aiohttp
import numpy as np
from aiortc import RTCSessionDescription
from PIL import Image

from cli.client import WhipPublisher, new_peer
from live.settings import GuardSettings
from tests.conftest import ARTIFACTS, make_speechlike
from tests.server_helpers import get_json, wait_until

MIN_INPUTS = 300
GUARD = GuardSettings()


class Pacer:
    """A client-side token bucket a little under the server's, so requests are not refused as a flood."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.tokens, self.burst = rate * 0.9, burst * 0.8, burst * 0.8
        self.stamp = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.rate)
            self.tokens = 1
            self.stamp = time.monotonic()
        self.tokens -= 1


@dataclass
class Outcomes:
    """What each input got back: (category, label, HTTP status or reply type, its message)."""

    rows: list[tuple[str, str, object, str]] = field(default_factory=list)

    def add(self, category: str, label: str, got: object, message: str = "") -> None:
        self.rows.append((category, label, got, message))

    def failures(self) -> list[tuple]:
        """Inputs that did not get a clear refusal: a 5xx, a 2xx, or a refusal without a message."""
        bad = []
        for row in self.rows:
            _, _, got, message = row
            ok = (isinstance(got, int) and 400 <= got < 500 and bool(message)) or got in ("error", "closed")
            if not ok:
                bad.append(row)
        return bad


# ----- corpora ---------------------------------------------------------------------------------------------
def broken_offers(base: str) -> list[tuple[str, str]]:
    """Invalid offers derived from a valid one (audio sendrecv + video recvonly): each is wrong in one way."""
    lines = base.rstrip("\r\n").split("\r\n")

    def without(prefix: str) -> str:
        return "\r\n".join(line for line in lines if not line.startswith(prefix)) + "\r\n"

    def swap(prefix: str, bad: str) -> str:
        out, done = [], False
        for line in lines:
            if line.startswith(prefix) and not done:
                line, done = bad, True
            out.append(line)
        assert done, prefix
        return "\r\n".join(out) + "\r\n"

    offers = [(f"without {p}", without(p)) for p in
              ("a=mid:", "a=fingerprint:", "a=ice-ufrag:", "a=ice-pwd:", "a=setup:", "m=audio", "v=0")]
    offers.append(("duplicated a=mid", base.replace("a=mid:1", "a=mid:0")))
    offers.append(("no fingerprint, ufrag or pwd", without("a=fingerprint:").replace("a=ice-", "a=x-ice-")))
    corruptions = [
        ("v=0", "v=0 extra"), ("o=", "o"), ("c=", "c=IN IP4"), ("c=", "c=XX IP4 1.2.3.4"), ("c=", "c=IN IP9 ::1"),
        ("m=audio", "m=audio"), ("m=audio", "m=audio x UDP/TLS/RTP/SAVPF 96"), ("m=audio", "m=audio 99999 RTP 96"),
        ("m=audio", "m=audio 9 UDP/TLS/RTP/SAVPF 300"), ("m=audio", "m=audio 9 UDP/TLS/RTP/SAVPF 72"),
        ("m=audio", "m=audio 9 udp/tls 96"), ("m=video", "m=video 9 UDP/TLS/RTP/SAVPF x y"),
        ("a=rtpmap:96", "a=rtpmap:96"), ("a=rtpmap:96", "a=rtpmap:x opus/48000/2"),
        ("a=rtpmap:96", "a=rtpmap:96 opus"), ("a=rtpmap:96", "a=rtpmap:96 opus/fast/2"),
        ("a=rtpmap:96", "a=rtpmap:96 opus/48000/two"), ("a=fmtp:98", "a=fmtp:98 apt=x"),
        ("a=fmtp:98", "a=fmtp:250 apt=97"), ("a=fmtp:98", "a=fmtp:98"), ("a=rtcp-fb:97", "a=rtcp-fb:97"),
        ("a=rtcp-fb:97", "a=rtcp-fb:x nack"), ("a=extmap:1", "a=extmap:x urn:x"), ("a=extmap:1", "a=extmap:1"),
        ("a=extmap:1", "a=extmap:1/sideways/x urn:x"), ("a=extmap:1", "a=extmap:1 urn:a extra"),
        ("a=ssrc:", "a=ssrc:12"), ("a=ssrc:", "a=ssrc:x cname:y"), ("a=ssrc:", "a=ssrc:12 cname"),
        ("a=ssrc-group:", "a=ssrc-group:FID one two"), ("a=rtcp:", "a=rtcp:x"), ("a=rtcp:", "a=rtcp:9 IN IP7 x"),
        ("a=setup:", "a=setup:"), ("a=setup:", "a=setup:bogus"), ("a=setup:", "a=setup:holdconn"),
        ("a=mid:", "a=mid:"), ("a=mid:", "a=mid:" + "m" * 100), ("a=fingerprint:", "a=fingerprint:sha-256"),
        ("a=fingerprint:", "a=fingerprint:md5 00:11"), ("a=fingerprint:", "a=fingerprint:sha-256 zz:zz extra"),
        ("a=ice-ufrag:", "a=ice-ufrag:"), ("a=ice-pwd:", "a=ice-pwd"), ("a=candidate:", "a=candidate:"),
        ("a=candidate:", "a=candidate:1 1 udp"), ("a=candidate:", "a=candidate:1 1 udp x 1.2.3.4 5 typ host"),
        ("a=candidate:", "a=candidate:1 1 udp 1 1.2.3.4 99999 typ host"),
        ("a=candidate:", "a=candidate:1 1 sctp 1 1.2.3.4 5 typ host"),
        ("a=candidate:", "a=candidate:1 1 udp 1 1.2.3.4 5 typ bogus"),
        ("a=candidate:", "a=candidate:1 1 udp 1 1.2.3.4 5 typ srflx raddr 0.0.0.0 rport x"),
        ("a=candidate:", "a=candidate:1 999 udp 1 1.2.3.4 5 typ host"),
        ("a=candidate:", "a=candidate:1 1 udp 99999999999 1.2.3.4 5 typ host"),
        ("a=sendrecv", "a"), ("a=sendrecv", "x=y"), ("a=sendrecv", "hello world"), ("a=sendrecv", "=x"),
        ("a=sendrecv", "A=sendrecv"), ("a=sendrecv", "a=" + "x" * 5000), ("a=sendrecv", "a=sendrecv\x00"),
    ]
    offers += [(f"{bad[:40]!r} for {prefix}", swap(prefix, bad)) for prefix, bad in corruptions]
    audio_end = next(i for i, line in enumerate(lines) if line.startswith("a=setup:"))
    offers += [(f"cut after line {n}", "\r\n".join(lines[:n]) + "\r\n") for n in (5, 7, 12, 20, audio_end - 1)]
    offers += [(f"cut mid-line {n}", "\r\n".join(lines[:n]) + "\r\n" + lines[n][: len(lines[n]) // 2])
               for n in (6, 10, 16, audio_end)]
    offers += [("empty", ""), ("blank lines", "\r\n\r\n\r\n"), ("not SDP", "hello"), ("v=1", base.replace("v=0", "v=1")),
               ("JSON", json.dumps({"type": "offer"})), ("NULs", "v=0\r\n" + "\x00" * 100),
               ("unicode", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:ü\u202e\r\n"),
               ("only m-lines", "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\n" * 500),
               ("LF only, no ICE", base.replace("\r\n", "\n").replace("a=ice-pwd", "a=x"))]
    return offers


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_header(width: int, height: int, idat: bytes = b"", bad_crc: bool = False) -> bytes:
    """A PNG declaring ``width`` × ``height`` RGB with ``idat`` as its (compressed) data."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if bad_crc:
        ihdr = ihdr[:-4] + b"\0\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header claims ``width`` × ``height``."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (90, 120, 200)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_with_huge_header(segments: int) -> bytes:
    """A valid JPEG preceded by ``segments`` maximal APP15 segments (64 KB of header each)."""
    data = encoded(Image.new("RGB", (16, 16), (10, 200, 40)), "JPEG")
    app = b"\xff\xef" + struct.pack(">H", 65535) + b"\0" * 65533
    return data[:2] + app * segments + data[2:]


def broken_images() -> list[tuple[str, bytes, str]]:
    """(label, body, content type) of images a server must refuse."""
    good_png = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    zeros = zlib.compress(b"\0" * 200_000, 9)
    return [
        ("decompression bomb 30000x30000", png_header(30_000, 30_000, zeros), "image/png"),
        ("decompression bomb 10000x10000 (warning size)", png_header(10_000, 10_000, zeros), "image/png"),
        ("bomb 65535x65535", png_header(65_535, 65_535, zeros), "image/png"),
        ("declares 4000x4000, data for none", png_header(4000, 4000, zeros), "image/png"),
        ("zero size", png_header(0, 0), "image/png"),
        ("PNG with a bad IHDR checksum", png_header(64, 64, zeros, bad_crc=True), "image/png"),
        ("PNG cut in half", good_png[: len(good_png) // 2], "image/png"),
        ("PNG signature only", good_png[:8], "image/png"),
        ("JPEG claiming 65500x65500", jpeg_with_size(65_500, 65_500), "image/jpeg"),
        ("JPEG claiming 20000x20000", jpeg_with_size(20_000, 20_000), "image/jpeg"),
        ("JPEG claiming 5000x16", jpeg_with_size(5000, 16), "image/jpeg"),
        ("JPEG claiming 0x0", jpeg_with_size(0, 0), "image/jpeg"),
        ("JPEG with 2 MB of header, claiming 9000x9000", jpeg_with_size(9000, 9000)[:2]
         + jpeg_with_huge_header(32)[2:2 + 32 * 65537] + jpeg_with_size(9000, 9000)[2:], "image/jpeg"),
        ("JPEG cut after its header", jpeg_with_size(16, 16)[:200], "image/jpeg"),
        ("GIF", encoded(Image.new("P", (8, 8)), "GIF"), "image/gif"),
        ("BMP", encoded(Image.new("RGB", (8, 8)), "BMP"), "image/bmp"),
        ("TIFF", encoded(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff"),
        ("ICO", encoded(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon"),
        ("SVG", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml"),
        ("WebP header only", b"RIFF\xff\xff\xff\xffWEBPVP8 ", "image/webp"),
        ("empty body", b"", "image/png"),
        ("random bytes", np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(), "image/png"),
        ("HTML", b"<html><body>hi</body></html>", "image/png"),
        ("PNG as text/plain", good_png, "text/plain"),
        ("PNG as multipart", good_png, "multipart/form-data; boundary=x"),
        ("PNG without a type", good_png, ""),
        ("PNG as application/json", good_png, "application/json"),
    ]


JSON_BODIES = [
    ("nested arrays 100k deep", "[" * 100_000 + "]" * 100_000),
    ("nested objects 5k deep", '{"a":' * 5000 + "1" + "}" * 5000),
    ("url nested 3k deep", '{"url": ' + "[" * 3000 + "]" * 3000 + "}"),
    ("not JSON", "{url: rtmp://x}"), ("empty", ""), ("null", "null"), ("number", "1e999999"),
    ("NaN", '{"url": NaN}'), ("lone surrogate", '{"url": "\\ud800"}'), ("array", '["rtmp://a/b/c"]'),
    ("url is a number", '{"url": 1}'), ("url is null", '{"url": null}'), ("url is an object", '{"url": {}}'),
    ("no url", '{"uri": "rtmp://a/b/c"}'), ("trailing garbage", '{"url": "rtmp://a/b/c"} x'),
    ("bytes", b"\xff\xfe\x00{"), ("huge", '{"url": "' + "x" * 10_000 + '"}'),
]
RTMP_URLS = [
    "rtmp://127.0.0.1:99999/live/key", "rtmp://127.0.0.1:-1/live/key", "rtmp://127.0.0.1:x/live/key",
    "rtmp://[::1/live/key", "rtmp://", "rtmp:///live/key", "rtmp://host", "rtmp://host/", "http://host/live/key",
    "file:///etc/passwd", "rtmp://host/live/key\r\nX: y", "rtmp://" + "h" * 3000 + "/a/b", "javascript:alert(1)",
    "rtmp://%zz/live/key", "gopher://127.0.0.1:6379/_x", "",
]


# ----- senders ---------------------------------------------------------------------------------------------
class Fuzzer:
    """Sends the corpus to one server and records what came back."""

    def __init__(self, server_url: str, http: aiohttp.ClientSession, outcomes: Outcomes) -> None:
        self.url = server_url
        self.http = http
        self.out = outcomes
        self.pace = Pacer(GUARD.http_rate, GUARD.http_burst)
        self.ws_pace = Pacer(GUARD.ws_rate, GUARD.ws_burst)

    async def request(self, category: str, label: str, method: str, path: str, **kwargs) -> None:
        await self.pace.wait()
        try:
            async with self.http.request(method, self.url + path, **kwargs) as resp:
                body = await resp.read()
                try:
                    message = json.loads(body)["message"] if resp.status >= 400 else "ok"
                except (ValueError, KeyError, TypeError):
                    message = body.decode(errors="replace")
                self.out.add(category, label, resp.status, message)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            self.out.add(category, label, "disconnected", str(exc))

    async def raw(self, label: str, data: bytes, reset: bool = False) -> None:
        """Raw bytes on a fresh connection; ``reset``: abort the connection (RST) instead of reading an answer."""
        await self.pace.wait()
        host, port = urlsplit(self.url).hostname, urlsplit(self.url).port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.sleep(0.05)
            self.out.add("raw", label, "closed")
            return
        head = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else "no answer"
        self.out.add("raw", label, status, head.split(b"\r\n\r\n", 1)[-1].decode(errors="replace") or "?")

    async def ws_exchange(self, ws: aiohttp.ClientWebSocketResponse, category: str, label: str, text: str) -> dict:
        await self.ws_pace.wait()
        await ws.send_str(text)
        while True:
            reply = await ws.receive_json(timeout=30)
            if reply["type"] != "stats":
                self.out.add(category, label, reply["type"], reply.get("message", ""))
                return reply


def _token_of(location: str) -> str:
    return parse_qs(urlsplit(location).query)["token"][0]


async def _session(server_url: str, session_id: str) -> dict:
    return next(s for s in (await get_json(server_url + "/health"))["sessions"] if s["id"] == session_id)


# ----- the test --------------------------------------------------------------------------------------------
async def test_malformed_inputs_get_clear_refusals_while_a_session_streams(server_url):
    log_path = ARTIFACTS / "server-tests.log"
    log_start = log_path.stat().st_size
    publisher = WhipPublisher(server_url, make_speechlike(120.0))
    await publisher.start()
    sid, view, control = publisher.session_id, publisher.view_token, _token_of(publisher.location)
    outcomes = Outcomes()
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    base = pc.localDescription.sdp
    try:
        await wait_until(lambda: _streaming(server_url, sid), 60, "the WHIP session to stream")
        before = await _session(server_url, sid)
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            fuzz = Fuzzer(server_url, http, outcomes)
            await asyncio.gather(_http_inputs(fuzz, base, sid, view, control),
                                 _websocket_inputs(fuzz, base, pc))
        elapsed = time.monotonic() - started
        health = await get_json(server_url + "/health")
        after = next(s for s in health["sessions"] if s["id"] == sid)
    finally:
        await pc.close()
        await publisher.stop()

    sent = after["frames_sent"] - before["frames_sent"]
    with open(log_path, "rb") as log:
        log.seek(log_start)
        lines = log.read().decode(errors="replace").splitlines()
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(
        {"inputs": len(outcomes.rows), "seconds": round(elapsed, 1), "frames_sent": sent,
         "outcomes": [list(map(str, row)) for row in outcomes.rows]}, indent=1))
    # Leave the address's buckets full for the tests that follow.
    await asyncio.sleep(max(GUARD.http_burst / GUARD.http_rate, GUARD.ws_burst / GUARD.ws_rate))

    failures = outcomes.failures()
    assert len(outcomes.rows) >= MIN_INPUTS, len(outcomes.rows)
    assert not failures, "\n".join(map(repr, failures[:20]))
    # The streaming session kept its output rate and kept generating; no refused offer left a session behind.
    assert sent >= 0.9 * 25 * elapsed, (sent, elapsed)
    assert after["frames_generated"] > before["frames_generated"]
    assert health["session_count"] == 1, health["sessions"]
    noisy = [line for line in lines if "Traceback" in line or " ERROR " in line or "CRITICAL" in line]
    assert not noisy, "\n".join(noisy[:20])


async def _streaming(server_url: str, session_id: str) -> bool:
    return (await _session(server_url, session_id))["frames_sent"] > 25


async def _http_inputs(fuzz: Fuzzer, base: str, sid: str, view: str, control: str) -> None:
    """Offers to WHIP and WHEP, JSON to the RTMP endpoint, images, URLs, headers and raw HTTP."""
    sdp_type = {"Content-Type": "application/sdp"}
    offers = broken_offers(base)
    for label, offer in offers:
        await fuzz.request("whip offer", label, "POST", "/whip", data=offer.encode(errors="surrogateescape"),
                           headers=sdp_type)
    # A refused offer never holds an admission slot: the streaming session is the only WHIP session (the WebSocket
    # inputs may have a talker session of their own meanwhile).
    sessions = (await get_json(fuzz.url + "/health"))["sessions"]
    assert [s["id"] for s in sessions if s["kind"] == "whip"] == [sid], sessions
    for label, offer in offers[::3]:
        await fuzz.request("whep offer", label, "POST", f"/whep/{sid}", data=offer,
                           headers={**sdp_type, "Authorization": f"Bearer {view}"})
    await fuzz.request("whip offer", "not UTF-8", "POST", "/whip", data=b"v=0\r\n\xff\xfe", headers=sdp_type)
    await fuzz.request("whip offer", "70 KB", "POST", "/whip", data="v=0\r\n" + "a=x:" + "y" * 70_000,
                       headers=sdp_type)
    for ctype in ("text/plain", "application/json", "", "application/sdp2", "multipart/form-data; boundary=b"):
        await fuzz.request("whip offer", f"content type {ctype!r}", "POST", "/whip", data=base,
                           headers={"Content-Type": ctype})

    rtmp = f"/api/sessions/{sid}/rtmp"
    control_json = {"Authorization": f"Bearer {control}", "Content-Type": "application/json"}
    for label, body in JSON_BODIES:
        await fuzz.request("rtmp json", label, "POST", rtmp, data=body, headers=control_json)
    for url in RTMP_URLS:
        await fuzz.request("rtmp json", f"url {url[:40]!r}", "POST", rtmp, json={"url": url},
                           headers={"Authorization": f"Bearer {control}"})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "", "application/json5"):
        await fuzz.request("rtmp json", f"content type {ctype!r}", "POST", rtmp,
                           data='{"url": "rtmp://127.0.0.1:99999/live/key"}',
                           headers={"Authorization": f"Bearer {control}", "Content-Type": ctype})

    for label, body, ctype in broken_images():
        await fuzz.request("image", label, "POST", "/api/images", data=body,
                           headers={"Content-Type": ctype} if ctype else {"Content-Type": ""})

    async def twelve_megabytes():
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    await fuzz.request("image", "12 MB chunked", "POST", "/api/images", data=twelve_megabytes(),
                       headers={"Content-Type": "image/png"})

    paths = [
        ("GET", "/view/<script>alert(1)</script>"), ("GET", "/static/../../etc/passwd"),
        ("GET", "/static/%2e%2e/%2e%2e/etc/passwd"), ("GET", "/samples/..%2f..%2fetc%2fpasswd.png"),
        ("GET", "/samples/" + "x" * 3000 + ".png"), ("GET", "/static/" + "%00"), ("GET", "/admin"),
        ("GET", "/api/sessions/%ff/rtmp"), ("GET", f"/api/sessions/{sid}/rtmp?token=%zz"),
        ("POST", "/whep/%00"), ("POST", "/whep/" + "s" * 2000), ("DELETE", f"/whip/{sid}/extra"),
        ("DELETE", f"/whep/{sid}/nope?token={view}"), ("DELETE", f"/whep/{sid}/nope"), ("DELETE", f"/whip/{sid}"),
        ("PUT", "/whip"), ("DELETE", "/health"), ("POST", "/health"), ("PATCH", f"/whip/{sid}"),
        ("POST", "/whip?image=nope"), ("POST", "/whip?image=" + "x" * 4000), ("POST", "/whip?prompt=" + "p" * 2000),
        ("POST", "/api/images?x=%00"), ("GET", "/api/sessions/nope/tokens"),
        ("GET", f"/api/sessions/{sid}/tokens?token={view}"), ("POST", f"/api/sessions/{sid}/tokens"),
        ("GET", "/samples/nope.png"), ("OPTIONS", "/whip"), ("GET", "//etc/passwd"),
        ("POST", f"/whep/{sid}?token=" + "t" * 3000), ("TRACE", "/"),
    ]
    for method, path in paths:
        await fuzz.request("url", f"{method} {path[:60]}", method, path, data=b"v=0\r\n", headers=sdp_type)

    headers = [
        {"Authorization": "Bearer"}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer " + "x" * 6000},
        {"Authorization": "Bearer a.b.c.d"}, {"Authorization": f"Bearer {sid}.view.99999999999999999999.sig"},
        {"Authorization": f"Bearer {sid}.control.1.sig"}, {"Authorization": "bearer  "},
        {"Authorization": "Bearer " + view + "x"}, {"Authorization": "Bearer \u00e9\u00e8"},
        {"Origin": "null"}, {"Origin": "http://evil.example"}, {"Origin": "file://"}, {"Origin": "::::"},
        {"Origin": "http://127.0.0.1:1"}, {"Host": "evil.example"}, {"Host": "[::1"}, {"Host": "a:99999"},
        {"Host": "localhost:abc"}, {"Host": "x" * 300}, {"Content-Type": "application/sdp; charset=ebcdic; x"},
        {"Content-Type": "application/sdp", "Content-Encoding": "gzip"},
        {"Content-Type": "application/sdp", "Transfer-Encoding": "gzip"},
        {"X-Forwarded-For": "1.2.3.4", "Origin": "http://evil.example"},
    ]
    for extra in headers:
        target = f"/whep/{sid}" if "Authorization" in extra else "/whip"
        await fuzz.request("header", repr(extra)[:60], "POST", target, data=b"v=0\r\nbroken",
                           headers={"Content-Type": "application/sdp", **extra})
    await fuzz.request("header", "GET /metrics with a view token", "GET", "/metrics",
                       headers={"Authorization": f"Bearer {view}"})

    raws = [
        ("garbage method", b"GARBAGE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("bad chunk size", b"POST /whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ("header without colon", b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("TLS client hello", bytes.fromhex("16030100a5010000a10303") + b"\0" * 40),
        ("Content-Length and chunked", b"POST /whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                                       b"Transfer-Encoding: chunked\r\nContent-Type: application/sdp\r\n\r\n0\r\n\r\n"),
        ("negative Content-Length", b"POST /whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"),
        ("huge header", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"x" * 20_000 + b"\r\n\r\n"),
        ("request line too long", b"GET /" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("NUL in path", b"GET /he\0alth HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ]
    for label, data in raws:
        await fuzz.raw(label, data)
    for path, ctype in (("/api/images", "image/png"), ("/whip", "application/sdp"), (f"/whep/{sid}", "application/sdp")):
        await fuzz.raw(f"reset mid-body on {path}", f"POST {path}?token={view} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 5000, reset=True)


async def _websocket_inputs(fuzz: Fuzzer, base: str, pc) -> None:
    """JSON, offers, candidates, RTMP URLs and odd frames over /ws; candidates go to a live talker session."""
    async with fuzz.http.ws_connect(fuzz.url + "/ws") as ws:
        texts = [
            ("not JSON", "{nope"), ("nested 100k", "[" * 100_000 + "]" * 100_000),
            ("nested objects", '{"type": "offer", "sdp": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}"),
            ("array", "[1, 2]"), ("string", '"offer"'), ("null", "null"), ("no type", "{}"),
            ("type is a number", '{"type": 1}'), ("unknown type", '{"type": "dance"}'),
            ("offer without sdp", '{"type": "offer"}'), ("sdp is a number", '{"type": "offer", "sdp": 5}'),
            ("image is a list", json.dumps({"type": "offer", "sdp": base, "image": ["x"]})),
            ("prompt too long", json.dumps({"type": "prompt", "prompt": "x" * 5000})),
            ("key too long", json.dumps({"type": "offer", "sdp": base, "key": "k" * 1000})),
            ("prompt before offer", json.dumps({"type": "prompt", "prompt": "hi"})),
            ("rtmp before offer", json.dumps({"type": "rtmp", "url": "rtmp://a/b/c"})),
            ("candidate before offer", json.dumps({"type": "candidate", "candidate": "candidate:1"})),
            ("lone surrogate", '{"type": "prompt", "prompt": "\\udfff"}'), ("huge number", '{"type": 1e999}'),
            ("100 KB", json.dumps({"type": "prompt", "prompt": "x" * 100_000})),
            ("bad rtmp in offer", json.dumps({"type": "offer", "sdp": base, "rtmp": "rtmp://h:99999/a/b"})),
            ("offer without H.264", json.dumps({"type": "offer", "sdp": base.replace("H264", "H265")})),
        ]
        texts += [(f"offer {label}", json.dumps({"type": "offer", "sdp": offer}))
                  for label, offer in broken_offers(base)[::4]]
        for label, text in texts:
            await fuzz.ws_exchange(ws, "ws json", label, text)
        await fuzz.ws_pace.wait()
        await ws.send_bytes(b"\x00\x01binary")
        reply = await ws.receive_json(timeout=30)
        fuzz.out.add("ws frame", "binary", reply["type"], reply.get("message", ""))

        # A live talker session, for trickled candidates and mid-session RTMP/prompt messages.
        await fuzz.ws_pace.wait()
        await ws.send_json({"type": "offer", "sdp": base})
        answer = await ws.receive_json(timeout=60)
        if answer["type"] != "answer":
            fuzz.out.add("ws talker", "a valid offer was refused", answer["type"], answer.get("message", ""))
            return
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        candidates = [
            ("", "0", 0), ("candidate:", "0", 0), ("candidate:1 1 udp", "0", 0), ("x" * 2000, "0", 0),
            ("candidate:1 1 udp x 1.2.3.4 5 typ host", "0", 0), ("candidate:1 1 udp 1 1.2.3.4 x typ host", "0", 0),
            ("candidate:1 1 udp 1 1.2.3.4 5 typ", "0", 0), ("candidate:1 1 udp 1 1.2.3.4 99999 typ host", "0", 0),
            ("candidate:1 0 udp 1 1.2.3.4 5 typ host", "0", 0), ("candidate:1 1 quic 1 1.2.3.4 5 typ host", "0", 0),
            ("candidate:1 1 udp 1 1.2.3.4 5 typ relay raddr", "0", 0),
            ("candidate:1 1 udp 1 1.2.3.4 5 typ srflx raddr 1.1.1.1 rport no", "0", 0),
            ("candidate:1 1 udp 1 1.2.3.4 5 typ host", None, None),
            ("candidate:\u00e9 1 udp 1 1.2.3.4 5 typ host", "0", 0), ("candidate:1 1 udp 1 1.2.3.4 5 typ host\n", "0", -1),
            ("candidate:1 1 udp 1 1.2.3.4 5 typ host", "x" * 100, 0),
        ]
        for cand, mid, index in candidates:
            text = json.dumps({"type": "candidate", "candidate": cand or "candidate:::", "sdpMid": mid,
                               "sdpMLineIndex": index})
            await fuzz.ws_exchange(ws, "ws candidate", repr(cand[:50]), text)
        for url in RTMP_URLS[:8]:
            await fuzz.ws_exchange(ws, "ws rtmp", repr(url[:40]), json.dumps({"type": "rtmp", "url": url}))
        await fuzz.ws_exchange(ws, "ws json", "second offer", json.dumps({"type": "offer", "sdp": base}))
        await ws.send_json({"type": "bye"})
        while (await ws.receive_json(timeout=30))["type"] != "ended":
            pass
    # Beyond the protocol's size limit the socket is closed (1009), and the server carries on.
    async with fuzz.http.ws_connect(fuzz.url + "/ws") as ws:
        await fuzz.ws_pace.wait()
        try:
            await ws.send_str("x" * (2 * 1024 * 1024))
        except ConnectionError:
            pass
        await ws.receive(timeout=30)
        fuzz.out.add("ws frame", "2 MB text", "closed" if ws.close_code == 1009 else ws.close_code)
