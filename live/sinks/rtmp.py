"""RTMP push of one session: the shared H.264 packets plus the session audio (AAC) as FLV, from a child process.

Only hosts the operator lists in ``output.rtmp_allowed_hosts`` are pushed to, over ``rtmp://`` or ``rtmps://``.
Each connection runs in a worker process (:mod:`live.sinks.rtmp_worker`) that muxes with PyAV: FFmpeg's RTMP client
can block for as long as a peer that accepts and never answers keeps it waiting, holding the GIL, and in a child
process that stalls nothing of the server. The server feeds the worker's stdin without ever waiting on it (the
event loop's pipe transport buffers; past ``MAX_BUFFER_BYTES`` packets are dropped and the video restarts at a
keyframe) and kills it when it does not connect within ``CONNECT_TIMEOUT_S`` or stops reading for ``IO_TIMEOUT_S``.

A failed connection — refused, dropped, silent or rejected — is retried with exponential backoff
(``BACKOFF_FIRST_S`` doubling up to ``BACKOFF_MAX_S``), each new stream starting at a fresh keyframe. Every failure
reports the same error text, so a push cannot be used to tell a closed port from a filtering firewall or a service
that speaks another protocol; the server log has the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from live.settings import RTMP_HOST_PATTERN
from live.sinks.encoder import AUDIO_PTIME, AudioChunk, SharedAudioEncoder, SharedVideoEncoder, VideoPacket
from live.sinks.rtmp_worker import AUDIO, CONFIG, VIDEO, encode_message
from model.audio_features import SAMPLE_RATE

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 5.0
STOP_GRACE_S = 2.0
WATCH_INTERVAL_S = 0.25
MAX_BUFFER_BYTES = 1 << 20
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
STABLE_S = 10.0
MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CONNECTION_FAILED = "could not stream to this RTMP destination; retrying"


class RtmpUrlError(ValueError):
    """The RTMP URL is not usable."""


class RtmpRefused(RtmpUrlError):
    """The RTMP URL's host is not on the operator's allow-list."""


def host_allowed(host: str, port: int, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``host``:``port`` matches one of ``allowed_hosts`` ('HOST' or 'HOST:PORT', '*' wildcards)."""
    host = f"[{host}]" if ":" in host else host
    for pattern in allowed_hosts:
        match = RTMP_HOST_PATTERN.fullmatch(pattern)
        if match is None:
            continue
        glob = ".*".join(re.escape(part) for part in match["host"].lower().split("*"))  # only '*' is special
        if re.fullmatch(glob, host.lower()) and (
                match["port"] is None or int(match["port"]) == port):
            return True
    return False


def check_url(url: str, allowed_hosts: Sequence[str] | None = None) -> str:
    """Validate an ``rtmp://`` / ``rtmps://`` URL (host and application path required) and, unless
    ``allowed_hosts`` is None, its host against them; returns it stripped. Raises :class:`RtmpUrlError` /
    :class:`RtmpRefused` saying why (:class:`RtmpPush` always checks the host)."""
    url = (url or "").strip()
    if len(url) > MAX_URL_CHARS:
        raise RtmpUrlError(f"RTMP URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise RtmpUrlError("RTMP URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:  # a port out of range, or brackets around something that is not an IPv6 address
        raise RtmpUrlError("RTMP URL is malformed: it must look like rtmp://host[:port]/app/stream-key with a port "
                           "of 1-65535") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise RtmpUrlError("RTMP URL must look like rtmp://host[:port]/app/stream-key (or rtmps://)")
    if not parts.path.strip("/"):
        raise RtmpUrlError("RTMP URL has no application/stream key path (rtmp://host/app/stream-key)")
    if allowed_hosts is not None and not host_allowed(parts.hostname, port, allowed_hosts):
        raise RtmpRefused(f"RTMP push to {parts.hostname} is not allowed on this server; its operator lists the "
                          "allowed hosts in output.rtmp_allowed_hosts (LIVE_AVATAR_OUTPUT__RTMP_ALLOWED_HOSTS)")
    return url


def redact(url: str) -> str:
    """The URL with its stream key (the last path segment) hidden, for status reports and logs."""
    parts = urlsplit(url)
    segments = parts.path.split("/")
    if len([s for s in segments if s]) >= 2:
        segments[-1] = "***"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "/".join(segments), "", ""))


@dataclass
class RtmpStatus:
    """What /health, the talk page and /metrics show about a push."""

    url: str
    state: str = "connecting"
    error: str | None = None
    reconnects: int = 0
    connected_at: float | None = None

    def as_dict(self) -> dict:
        """JSON form; ``live_s`` is the age of the current connection."""
        live = None if self.connected_at is None else round(time.monotonic() - self.connected_at, 1)
        return {"url": self.url, "state": self.state, "error": self.error, "reconnects": self.reconnects,
                "live_s": live}


class _ConnectionFailed(Exception):
    """One connection of the push ended badly; the message is the detail for the log."""


class RtmpPush:
    """One RTMP push of a session. :meth:`start` and :meth:`stop` on the event loop; ``stop`` is idempotent."""

    def __init__(self, url: str, video: SharedVideoEncoder, audio: SharedAudioEncoder, allowed_hosts: Sequence[str],
                 audio_kbps: int = 128) -> None:
        """Push ``video``'s packets and ``audio``'s chunks to ``url`` (checked with :func:`check_url`)."""
        self.url = check_url(url, allowed_hosts)
        self.status = RtmpStatus(redact(self.url))
        self._video = video
        self._audio = audio
        self._audio_bitrate = audio_kbps * 1000
        self._stopping = asyncio.Event()
        self._unsubscribe: list = []
        self._task: asyncio.Task | None = None
        self._worker: asyncio.subprocess.Process | None = None
        self._need_key = True
        self._written = 0

    def start(self) -> None:
        """Subscribe to the session's packets and start connecting."""
        self._unsubscribe = [self._video.packets.subscribe(self._deliver_video),
                             self._audio.chunks.subscribe(self._deliver_audio)]
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop pushing: the worker gets end-of-input (and is killed if it does not exit in ``STOP_GRACE_S``)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._stopping.set()
        if self._task is not None:
            await self._task
        self.status.state, self.status.connected_at = "stopped", None

    @property
    def connected(self) -> bool:
        """Whether the push is streaming now."""
        return self.status.state == "live"

    # ----- packets to the worker -------------------------------------------------------------------------
    def _send(self, message: bytes) -> bool:
        """Write ``message`` to the worker unless it is not taking packets or its pipe is backed up."""
        worker = self._worker
        if worker is None or worker.stdin.is_closing():
            return False
        if worker.stdin.transport.get_write_buffer_size() > MAX_BUFFER_BYTES:
            # The RTMP server is slower than real time: drop, and restart the video at a keyframe.
            if not self._need_key:
                self._need_key = True
                self._video.request_keyframe()
            return False
        worker.stdin.write(message)
        self._written += len(message)
        return True

    def _deliver_video(self, packet: VideoPacket) -> None:
        if self._need_key and not packet.keyframe:
            return
        if self._send(encode_message(VIDEO, packet.n, packet.data, packet.keyframe)) and packet.keyframe:
            self._need_key = False

    def _deliver_audio(self, chunk: AudioChunk) -> None:
        self._send(encode_message(AUDIO, chunk.index, chunk.pcm.tobytes()))

    # ----- connections -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self._connection()
            except Exception as exc:  # noqa: BLE001 - any failure of a connection means: reconnect
                detail = str(exc) or exc.__class__.__name__
                self.status.error = CONNECTION_FAILED
            else:
                break  # stopped
            self.status.connected_at = None
            if self._stopping.is_set():
                break
            attempt = 0 if time.monotonic() - started > STABLE_S else attempt + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempt - 1))
            self.status.state = "reconnecting"
            self.status.reconnects += 1
            log.info("RTMP %s: %s; reconnecting in %.1f s", self.status.url, detail, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _connection(self) -> None:
        """One worker process: returns when the push stops, raises :class:`_ConnectionFailed` when it fails."""
        self.status.state = "connecting"
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "live.sinks.rtmp_worker", cwd=PACKAGE_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._worker, self._need_key, self._written = worker, True, 0
        self._video.request_keyframe()
        config = {"url": self.url, "fps": self._video.fps, "width": self._video.width, "height": self._video.height,
                  "sample_rate": SAMPLE_RATE, "chunk_s": AUDIO_PTIME, "audio_bitrate": self._audio_bitrate}
        worker.stdin.write(encode_message(CONFIG, payload=json.dumps(config).encode()))
        reports = asyncio.ensure_future(self._read_reports(worker))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await self._watch(worker, reports, stopping)
        finally:
            self._worker = None
            stopping.cancel()
            await self._end(worker, graceful=self.connected)
            reports.cancel()

    async def _watch(self, worker: asyncio.subprocess.Process, reports: asyncio.Task, stopping: asyncio.Task) -> None:
        """Wait for the stop, the worker's end, or a timeout (not connected, or not reading its input)."""
        connect_by = time.monotonic() + CONNECT_TIMEOUT_S
        consumed, progress_at = 0, time.monotonic()
        while True:
            await asyncio.wait([reports, stopping], timeout=WATCH_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return
            if reports.done():
                raise _ConnectionFailed(reports.result())
            now = time.monotonic()
            if not self.connected and now > connect_by:
                raise _ConnectionFailed(f"no RTMP session within {CONNECT_TIMEOUT_S:g} s")
            buffered = worker.stdin.transport.get_write_buffer_size()
            if buffered == 0 or self._written - buffered > consumed:
                consumed, progress_at = self._written - buffered, now
            elif now - progress_at > IO_TIMEOUT_S:
                raise _ConnectionFailed(f"the RTMP server took nothing for {IO_TIMEOUT_S:g} s")

    async def _read_reports(self, worker: asyncio.subprocess.Process) -> str:
        """Follow the worker's reports until it exits; returns why it ended."""
        detail = "the push worker exited"
        async for line in worker.stdout:
            try:
                report = json.loads(line)
            except json.JSONDecodeError:
                continue
            if report.get("state") == "live":
                self.status.state, self.status.error = "live", None
                self.status.connected_at = time.monotonic()
            elif "error" in report:
                detail = str(report["error"])
        return detail

    @staticmethod
    async def _end(worker: asyncio.subprocess.Process, graceful: bool) -> None:
        """Reap the worker: a connected one gets end-of-input to finish its stream (and is killed if it has not
        exited after ``STOP_GRACE_S``); one still connecting is killed at once."""
        if worker.returncode is None:
            worker.stdin.close()
            if graceful:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(worker.wait(), STOP_GRACE_S)
            if worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it exited just now
                    worker.kill()
        await worker.wait()
