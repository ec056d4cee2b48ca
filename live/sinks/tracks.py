"""WebRTC tracks of a session's output: thin adapters that hand aiortc the session's shared encoders' packets.

aiortc's ``RTCRtpSender`` packetizes an ``av.Packet`` from ``recv()`` without encoding it (H.264 and Opus alike),
so every sender of a session — the talker's and each WHEP viewer's — sends the same encoded stream. Keyframe
requests (PLI/FIR) reach the sender's ``_send_keyframe``, which only affects frames aiortc encodes itself; for
packet tracks :func:`route_keyframe_requests` points it at the shared encoder instead. Under packet loss
:func:`repeat_retransmissions` answers each NACK three times.
"""

from __future__ import annotations

import asyncio
import fractions
from collections import deque

import av
from aiortc import MediaStreamTrack, RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from live.peer import OfferError
from live.sinks.encoder import (
    AUDIO_CHUNK,
    AudioChunk,
    SharedAudioEncoder,
    SharedVideoEncoder,
    VideoPacket,
)
from model.audio_features import SAMPLE_RATE

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
OPUS_CLOCK_RATE = 48000
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_CLOCK_RATE)
OPUS_TICKS_PER_CHUNK = OPUS_CLOCK_RATE * AUDIO_CHUNK // SAMPLE_RATE
VIDEO_BACKLOG = 25
AUDIO_BACKLOG = 25
RETRANSMIT_COPIES = 3


class _Subscription:
    """A bounded queue of a fan-out's items for one track; the oldest item goes when it is full."""

    def __init__(self, capacity: int) -> None:
        self.items: deque = deque(maxlen=capacity)
        self.overflowed = False
        self._ready = asyncio.Event()
        self.unsubscribe = lambda: None

    def deliver(self, item) -> None:
        if len(self.items) == self.items.maxlen:
            self.overflowed = True
        self.items.append(item)
        self._ready.set()

    async def get(self):
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        return self.items.popleft()

    def close(self) -> None:
        self.unsubscribe()
        self.items.append(None)
        self._ready.set()


class _EncodedTrack(MediaStreamTrack):
    """A track that sends a shared encoder's packets through its own fan-out subscription."""

    def __init__(self, encoder: SharedVideoEncoder | SharedAudioEncoder) -> None:
        """Send ``encoder``'s packets (subscribed at the first ``recv``)."""
        super().__init__()
        self._encoder = encoder
        self._sub: _Subscription | None = None

    def stop(self) -> None:
        """Stop sending and leave the encoder's fan-out."""
        if self._sub is not None:
            self._sub.close()
        super().stop()


def _packet(data: bytes, pts: int, time_base) -> av.Packet:
    """An ``av.Packet`` of ``data`` stamped ``pts`` in ``time_base``."""
    packet = av.Packet(data)
    packet.pts = packet.dts = pts
    packet.time_base = time_base
    return packet


class AvatarVideoTrack(_EncodedTrack):
    """The session's encoded video: the packet of frame ``n`` stamped ``n / fps`` on the session clock (90 kHz).

    A new track starts at a keyframe (it asks the encoder for one and skips packets until it comes); a track that
    falls ``VIDEO_BACKLOG`` packets behind drops the oldest and waits for the next keyframe again, asking for it.
    """

    kind = "video"

    def __init__(self, encoder: SharedVideoEncoder) -> None:
        """Send ``encoder``'s packets."""
        super().__init__(encoder)
        self._need_key = True

    async def recv(self) -> av.Packet:
        """The next encoded frame as it leaves the shared encoder."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._sub is None:
            self._sub = _Subscription(VIDEO_BACKLOG)
            self._sub.unsubscribe = self._encoder.packets.subscribe(self._sub.deliver)
            self._encoder.request_keyframe()
        while True:
            if self._sub.overflowed:
                self._sub.overflowed, self._need_key = False, True
                self._encoder.request_keyframe()
            item: VideoPacket | None = await self._sub.get()
            if item is None:
                raise MediaStreamError
            if self._need_key and not item.keyframe:
                continue
            self._need_key = False
            return _packet(item.data, round(item.n * VIDEO_CLOCK_RATE / self._encoder.fps), VIDEO_TIME_BASE)


class AvatarAudioTrack(_EncodedTrack):
    """The session's input audio, delayed like the video: one Opus packet per 20 ms chunk of the session clock."""

    kind = "audio"

    async def recv(self) -> av.Packet:
        """The next 20 ms Opus packet, released at its media time."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._sub is None:
            self._sub = _Subscription(AUDIO_BACKLOG)
            self._sub.unsubscribe = self._encoder.chunks.subscribe(self._sub.deliver)
        item: AudioChunk | None = await self._sub.get()
        if item is None:
            raise MediaStreamError
        return _packet(item.opus, item.index * OPUS_TICKS_PER_CHUNK, OPUS_TIME_BASE)


def route_keyframe_requests(transceiver: RTCRtpTransceiver, encoder: SharedVideoEncoder) -> None:
    """Send this sender's PLI/FIR keyframe requests to the shared encoder.

    aiortc 1.16 handles PLI/FIR in ``RTCRtpSender._handle_rtcp_packet`` by calling ``self._send_keyframe()``, which
    only flags the sender's own encoder; that encoder never runs for a track that returns packets. Overriding the
    method on this one sender instance is the smallest hook that routes the request to the encoder that does.
    """
    transceiver.sender._send_keyframe = encoder.request_keyframe


def repeat_retransmissions(transceiver: RTCRtpTransceiver, copies: int = RETRANSMIT_COPIES) -> None:
    """Answer every NACK of this sender with ``copies`` retransmissions of each packet instead of one.

    A receiver that stalls on a missing packet waits for its retransmission; when that is lost too, many receivers
    (aiortc's, for one) ask again only once they notice a new gap, and the picture freezes until then: over three
    minutes at 10 % loss the longest freeze was 1.9 s with one copy, 1.5 s with two, 0.4 s with three
    (bench/RESULTS.md, "Packet loss"). Three copies make a lost answer as unlikely as three losses in a row; they
    cost (copies - 1) × the loss rate in video traffic (a fifth more at 10 % loss, nothing without loss). aiortc 1.16
    handles NACKs in ``RTCRtpSender._handle_rtcp_packet`` through ``self._retransmit(seq)``; wrapping it on this one
    sender instance is the hook, as for keyframe requests.
    """
    retransmit = transceiver.sender._retransmit

    async def repeated(sequence_number: int) -> None:
        for _ in range(copies):
            await retransmit(sequence_number)

    transceiver.sender._retransmit = repeated


def prefer_h264(transceiver: RTCRtpTransceiver) -> None:
    """Offer only H.264 (what the shared encoder makes), keeping retransmission (RTX)."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() in ("video/h264", "video/rtx")])


def check_h264_offer(offer_sdp: str) -> None:
    """Raise :class:`OfferError` unless the offer's video accepts H.264 with packetization-mode 1 (the only video
    the shared encoder makes; aiortc itself would answer with a bare "Failed to set ... send parameters")."""
    for media in SessionDescription.parse(offer_sdp).media:
        if media.kind == "video" and not any(
                c.mimeType.lower() == "video/h264" and str(c.parameters.get("packetization-mode")) == "1"
                for c in media.rtp.codecs):
            raise OfferError("this server sends H.264 video (one encode shared by every viewer); the offer's "
                             "video accepts no H.264 with packetization-mode 1")
