"""RTMP push of one session: the shared H.264 packets plus the session audio (encoded to AAC here) as FLV.

PyAV's muxer writes block on the network (and a dead server can stall them for seconds), so all of it runs on a
thread of its own, fed by a bounded queue from the event loop. When the server drops the connection or refuses it,
the push reconnects by itself with exponential backoff (``BACKOFF_FIRST_S`` doubling up to ``BACKOFF_MAX_S``) and
starts the new stream at a fresh keyframe. Timestamps come from the session clock: video frame ``n`` is
``n / fps`` and audio chunk ``i`` is ``i * 0.02`` s, both relative to the first keyframe of the connection, so the
two stay in sync however late either arrives in the queue.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import av

from live.sinks.encoder import (
    AUDIO_PTIME,
    AudioChunk,
    SharedAudioEncoder,
    SharedVideoEncoder,
    VideoPacket,
)
from model.audio_features import SAMPLE_RATE

log = logging.getLogger(__name__)

MS = fractions.Fraction(1, 1000)
AAC_RATE = 48000
AAC_TIME_BASE = fractions.Fraction(1, AAC_RATE)
QUEUE_ITEMS = 256
IO_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
STABLE_S = 10.0
MAX_URL_CHARS = 2048
NAL_SPS, NAL_PPS = 7, 8


class RtmpUrlError(ValueError):
    """The RTMP URL is not usable."""


def check_url(url: str) -> str:
    """Validate an ``rtmp://`` / ``rtmps://`` URL (host and application path required); returns it stripped."""
    url = (url or "").strip()
    if len(url) > MAX_URL_CHARS:
        raise RtmpUrlError(f"RTMP URL is longer than {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("rtmp", "rtmps") or not parts.hostname:
        raise RtmpUrlError("RTMP URL must look like rtmp://host[:port]/app/stream-key")
    if not parts.path.strip("/"):
        raise RtmpUrlError("RTMP URL has no application/stream key path (rtmp://host/app/stream-key)")
    return url


def redact(url: str) -> str:
    """The URL with its stream key (the last path segment) hidden, for status reports and logs."""
    parts = urlsplit(url)
    segments = parts.path.split("/")
    if len([s for s in segments if s]) >= 2:
        segments[-1] = "***"
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "/".join(segments), "", ""))


def parameter_sets(access_unit: bytes) -> bytes:
    """The SPS and PPS NAL units (annex-B) of a keyframe: the FLV stream's decoder configuration."""
    out = []
    for nal in access_unit.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01"):
        nal = nal.rstrip(b"\x00")
        if nal and nal[0] & 0x1F in (NAL_SPS, NAL_PPS):
            out.append(b"\x00\x00\x00\x01" + nal)
    return b"".join(out)


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


class _Stopped(Exception):
    """The push was stopped while it waited for packets."""


class RtmpPush:
    """One RTMP push of a session. :meth:`start` on the event loop; :meth:`stop` ends it (idempotent)."""

    def __init__(self, url: str, video: SharedVideoEncoder, audio: SharedAudioEncoder, audio_kbps: int = 128) -> None:
        """Push ``video``'s packets and ``audio``'s chunks to ``url`` (checked with :func:`check_url`)."""
        self.url = check_url(url)
        self.status = RtmpStatus(redact(self.url))
        self._video = video
        self._audio = audio
        self._audio_bitrate = audio_kbps * 1000
        self._queue: queue.Queue[VideoPacket | AudioChunk | None] = queue.Queue(QUEUE_ITEMS)
        self._stop = threading.Event()
        self._unsubscribe: list = []
        self._thread = threading.Thread(target=self._run, name=f"rtmp {self.status.url}", daemon=True)

    def start(self) -> None:
        """Subscribe to the session's packets and start the push thread."""
        self._unsubscribe = [self._video.packets.subscribe(self._deliver), self._audio.chunks.subscribe(self._deliver)]
        self._thread.start()

    async def stop(self) -> None:
        """Stop pushing and wait (off the loop) for the thread to close its connection."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._stop.set()
        self._deliver(None)
        await asyncio.to_thread(self._thread.join, IO_TIMEOUT_S * 2)
        self.status.state, self.status.connected_at = "stopped", None

    @property
    def connected(self) -> bool:
        """Whether the push is streaming now."""
        return self.status.state == "live"

    def _deliver(self, item: VideoPacket | AudioChunk | None) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # The server is slower than real time: drop the oldest and restart the video at a keyframe.
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put_nowait(item)
            self._video.request_keyframe()

    # ----- the push thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._stream()
            except _Stopped:
                break
            except Exception as exc:  # noqa: BLE001 - any failure of the connection means: reconnect
                self.status.error = f"{exc.__class__.__name__}: {exc}"
            self.status.connected_at = None
            if self._stop.is_set():
                break
            attempt = 0 if time.monotonic() - started > STABLE_S else attempt + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempt - 1))
            self.status.state = "reconnecting"
            self.status.reconnects += 1
            log.info("RTMP %s: %s; reconnecting in %.1f s", self.status.url, self.status.error, delay)
            self._stop.wait(delay)
            self._discard_queue()

    def _discard_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _next(self) -> VideoPacket | AudioChunk:
        item = self._queue.get()
        if item is None or self._stop.is_set():
            raise _Stopped
        return item

    def _stream(self) -> None:
        """One connection: from a keyframe until the server drops it (raises) or the push stops."""
        self.status.state = "connecting"
        self._video.request_keyframe()
        key = self._next()
        while not (isinstance(key, VideoPacket) and key.keyframe):
            key = self._next()
        fps = self._video.fps
        t0 = key.n / fps
        container = av.open(self.url, "w", format="flv", timeout=(IO_TIMEOUT_S, IO_TIMEOUT_S))
        try:
            vstream = container.add_stream("h264", rate=fps)
            vstream.width, vstream.height = self._video.codec.width, self._video.codec.height
            vstream.time_base = MS
            vstream.codec_context.extradata = parameter_sets(key.data)
            astream = container.add_stream("aac", rate=AAC_RATE, layout="stereo")
            astream.codec_context.bit_rate = self._audio_bitrate
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AAC_RATE,
                                          frame_size=astream.codec_context.frame_size or 1024)
            audio_next: int | None = None
            item: VideoPacket | AudioChunk = key
            while True:
                if isinstance(item, VideoPacket):
                    packet = av.Packet(item.data)
                    packet.stream = vstream
                    packet.pts = packet.dts = round((item.n / fps - t0) * 1000)
                    packet.time_base = MS
                    packet.is_keyframe = item.keyframe
                    container.mux(packet)
                    if self.status.state != "live":
                        self.status.state, self.status.error = "live", None
                        self.status.connected_at = time.monotonic()
                elif item.index * AUDIO_PTIME >= t0:
                    if audio_next != item.index:
                        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AAC_RATE,
                                                      frame_size=astream.codec_context.frame_size or 1024)
                    audio_next = item.index + 1
                    frame = av.AudioFrame.from_ndarray(item.pcm.reshape(1, -1), format="s16", layout="mono")
                    frame.sample_rate = SAMPLE_RATE
                    frame.pts = round((item.index * AUDIO_PTIME - t0) * SAMPLE_RATE)
                    frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
                    for out in resampler.resample(frame):
                        for packet in astream.encode(out):
                            container.mux(packet)
                item = self._next()
        finally:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
