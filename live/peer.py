"""One WebRTC peer connection of a session (talker, WHIP ingest or WHEP viewer) and SDP negotiation."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription, candidate_from_sdp

from live.settings import IceServer

MAX_SDP_BYTES = 64 * 1024
AUDIO_JITTER_PACKETS = 16  # aiortc's own capacity: 320 ms of 20 ms packets to reorder within


class OfferError(ValueError):
    """An SDP offer is malformed or lacks what the endpoint needs."""


def release_audio_promptly(receiver) -> bool:
    """Make ``receiver`` (an aiortc ``RTCRtpReceiver`` of audio) hand on each voice packet as soon as it is complete.

    aiortc's audio jitter buffer holds 4 packets (80 ms) before it releases the oldest. That buys nothing here: a
    missing packet stalls it either way until the buffer is full, and the session's audio feed already absorbs late
    packets (it fills silence after its input slack). Released at once, the talker's voice reaches the engine
    ~60-80 ms sooner, which is that much off the voice-to-mouth delay. Returns False (and changes nothing) if this
    aiortc keeps its buffer elsewhere.
    """
    name = "_RTCRtpReceiver__jitter_buffer"
    if not isinstance(getattr(receiver, name, None), JitterBuffer):
        return False
    setattr(receiver, name, JitterBuffer(capacity=AUDIO_JITTER_PACKETS, prefetch=1))
    return True


def parse_offer(sdp: str, need: tuple[str, ...] = ()) -> SessionDescription:
    """Check an SDP offer before any peer is created: size, syntax, and the media kinds in ``need``."""
    if not sdp or not sdp.strip():
        raise OfferError("empty SDP offer")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise OfferError(f"SDP offer is larger than {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("not an SDP offer (it must start with 'v=0')")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the malformed line provokes
        raise OfferError(f"malformed SDP offer: {exc.__class__.__name__}: {exc}") from exc
    kinds = {m.kind for m in desc.media}
    for kind in need:
        if kind not in kinds:
            raise OfferError(f"SDP offer has no {kind} section")
    return desc


def dtls_passive(offer_sdp: str, answer: RTCSessionDescription) -> RTCSessionDescription:
    """``answer`` with ``a=setup:passive`` (we are the DTLS server) wherever the offer left the choice to us
    (``actpass``), as browsers answer.

    aiortc 1.16 answers ``actpass`` with ``active`` and then, as the DTLS client, offers only ECDHE-ECDSA cipher
    suites: a peer with an RSA certificate (GStreamer's webrtcbin, and other OpenSSL-based stacks) fails the
    handshake with "no shared cipher". As the DTLS server aiortc presents its ECDSA certificate and the client
    chooses among the suites it offers, which every WebRTC stack's include. aiortc takes the role from the local
    answer it is given (``setLocalDescription``).
    """
    offered = SessionDescription.parse(offer_sdp).media
    desc = SessionDescription.parse(answer.sdp)
    for offer_media, media in zip(offered, desc.media):
        if offer_media.dtls is not None and offer_media.dtls.role == "auto" and media.dtls is not None:
            media.dtls.role = "server"
    return RTCSessionDescription(sdp=str(desc), type="answer")


def rtc_configuration(ice_servers: Sequence[IceServer] = ()) -> RTCConfiguration:
    """aiortc's configuration for ``ice_servers``; none means host candidates only (loopback and LAN need no more).

    aiortc uses the first ``stun:`` and the first ``turn:``/``turns:`` URL (``stuns:`` is for browsers only). Gathering
    waits for them, so an unreachable server delays every offer or answer by up to aioice's 5 s timeout.
    """
    return RTCConfiguration(iceServers=[RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
                                        for s in ice_servers])


def _ignore_gone(link: "PeerLink", reason: str) -> None:
    """``on_gone`` of a closed link."""


class PeerLink:
    """An ``RTCPeerConnection`` with a role, an id and a notion of liveness.

    Liveness is the wall time of the latest sign of the remote peer: RTCP receiver reports on our senders (the
    peer is watching) or :meth:`touch` (mic audio arrived, a signaling message came in).
    """

    def __init__(self, role: str, on_gone: Callable[["PeerLink", str], None],
                 ice_servers: Sequence[IceServer] = ()) -> None:
        """Create the connection with ``ice_servers`` (STUN/TURN); ``on_gone(link, reason)`` runs once when ICE/DTLS
        fails or it closes."""
        self.role = role
        self.id = secrets.token_urlsafe(8)
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self.created = time.time()
        self.last_seen = self.created
        self._on_gone = on_gone
        self._gone = False
        self._drains: set[asyncio.Task] = set()
        self.pc.on("connectionstatechange", self._state_changed)

    def touch(self) -> None:
        """Record a sign of life from the remote peer."""
        self.last_seen = time.time()

    async def last_activity(self) -> float:
        """Wall time of the latest sign of life (receiver reports included)."""
        latest = self.last_seen
        for sender in self.pc.getSenders():
            if sender.track is None:
                continue
            for stats in (await sender.getStats()).values():
                if stats.type == "remote-inbound-rtp":
                    latest = max(latest, stats.timestamp.timestamp())
        return latest

    async def answer(self, offer_sdp: str, refuse: tuple[str, ...] = ()) -> str:
        """Apply the remote offer and return our complete answer (aiortc gathers candidates before answering).

        Offered media of the kinds in ``refuse`` that we do not send are answered ``inactive``, so the peer does
        not spend bandwidth on them (e.g. OBS's video on a WHIP ingest that only needs the voice).
        """
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError/OperationError/... for unusable offers
            raise OfferError(f"unusable SDP offer: {exc}") from exc
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind in refuse and transceiver.sender.track is None:
                transceiver.direction = "inactive"
            if transceiver.kind == "audio":
                release_audio_promptly(transceiver.receiver)
        await self.pc.setLocalDescription(dtls_passive(offer_sdp, await self.pc.createAnswer()))
        return self.pc.localDescription.sdp

    async def add_candidate(self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None) -> None:
        """Add a trickled remote ICE candidate (``candidate:…`` line); raises ``OfferError`` with the reason when
        it is malformed or unusable."""
        try:
            cand = candidate_from_sdp(candidate.removeprefix("candidate:"))
        except (ValueError, IndexError) as exc:
            raise OfferError(f"malformed ICE candidate: {exc}") from None
        cand.sdpMid, cand.sdpMLineIndex = sdp_mid, sdp_mline_index
        mids = sorted(t.mid for t in self.pc.getTransceivers() if t.mid is not None)
        if sdp_mid is not None and sdp_mid not in mids:  # aiortc would drop it without a word
            raise OfferError(f"ICE candidate for media section {sdp_mid[:40]!r}, which this connection does not have "
                             f"(its sdpMid values: {', '.join(mids) or 'none yet'})")
        try:
            await self.pc.addIceCandidate(cand)
        except Exception as exc:  # noqa: BLE001 - aiortc raises ValueError/InvalidStateError for bad candidates
            raise OfferError(f"ICE candidate rejected: {exc}") from None

    def drain(self, track: MediaStreamTrack) -> None:
        """Read and discard a remote track we do not use, so its frames never pile up."""
        async def run() -> None:
            try:
                while True:
                    await track.recv()
            except MediaStreamError:
                pass

        task = asyncio.ensure_future(run())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def close(self) -> None:
        """Close the connection (idempotent); ``on_gone`` is not called for a close we started.

        aiortc's closed connection is a web of reference cycles that only a full garbage collection frees, so the
        link drops every callback into its owner here: the owner (a session, with its engine and buffers) is then
        freed as soon as its last reference goes.
        """
        self._gone = True
        for task in list(self._drains):
            task.cancel()
        await self.pc.close()
        self.pc.remove_all_listeners()
        self._on_gone = _ignore_gone

    async def _state_changed(self) -> None:
        state = self.pc.connectionState
        if state in ("failed", "closed") and not self._gone:
            self._gone = True
            self._on_gone(self, f"peer connection {state}")
