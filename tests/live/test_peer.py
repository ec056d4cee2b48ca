"""One peer connection (live.peer): the talker's voice leaves aiortc's receive buffer as soon as each packet is
complete, and trickled candidates for a media section the connection lacks are refused, not dropped."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from live.peer import OfferError, PeerLink


def _released_after(buffer) -> int:
    """How many 20 ms Opus packets ``buffer`` must hold before it hands on the first one."""
    for seq in range(16):
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * seq, payload=b"x")
        packet._data = packet.payload  # what aiortc's receiver sets once it has depacketised the payload
        _, frame = buffer.add(packet)
        if frame is not None:
            assert frame.timestamp == 0
            return seq + 1
    return 16


async def test_answered_audio_is_released_one_packet_later() -> None:
    client = RTCPeerConnection()
    sent = client.addTransceiver("audio", direction="sendrecv")
    link = PeerLink("talker", lambda lk, reason: None)
    try:
        await client.setLocalDescription(await client.createOffer())
        await link.answer(client.localDescription.sdp)
        (audio,) = [t for t in link.pc.getTransceivers() if t.kind == "audio"]
        # a packet is complete when the next one (a new timestamp) arrives; aiortc's own buffer (the client's, left
        # alone) waits for 4 more
        assert _released_after(audio.receiver._RTCRtpReceiver__jitter_buffer) == 2
        assert _released_after(sent.receiver._RTCRtpReceiver__jitter_buffer) == 5
    finally:
        await link.close()
        await client.close()


async def test_a_candidate_for_an_unknown_media_section_is_refused_with_the_known_ones() -> None:
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="sendrecv")
    link = PeerLink("talker", lambda lk, reason: None)
    try:
        await client.setLocalDescription(await client.createOffer())
        await link.answer(client.localDescription.sdp)
        with pytest.raises(OfferError, match=r"media section 'video'.*sdpMid values: 0"):
            await link.add_candidate("candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "video", 1)
        await link.add_candidate("candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "0", 0)
    finally:
        await link.close()
        await client.close()
