"""One encode per session: the shared H.264 stream is WebRTC-safe, and a talker plus three WHEP viewers (real
aiortc peers) all receive it while the session encodes each frame once."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cli.client import WhepViewer, talk
from live.metrics import ServerMetrics
from live.settings import OutputSettings
from live.sinks.encoder import SharedVideoEncoder
from tests.server_helpers import API_KEY, AUTH, get_json, get_text, wait_until

VIEWERS = 3
WATCH_S = 4.0


def _nal_types(access_unit: bytes) -> list[int]:
    return [nal[0] & 0x1F for nal in access_unit.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01")
            if nal]


def test_shared_encoder_makes_webrtc_safe_h264_with_keyframes_on_request():
    encoder = SharedVideoEncoder(64, 64, 25, OutputSettings(keyframe_interval_s=2.0), ServerMetrics())
    rng = np.random.default_rng(0)
    packets = []
    for n in range(60):
        if n in (20, 24):
            encoder.request_keyframe()
        packets += encoder.encode(n, rng.integers(0, 255, (64, 64, 3), np.uint8))
    assert [p.n for p in packets] == list(range(60))  # one packet per frame, in order: no B-frames, no delay
    keys = [p.n for p in packets if p.keyframe]
    # The first frame and the request at 20; the one at 24 waits out the rate limit (one per 0.5 s = 12 frames).
    assert keys[:3] == [0, 20, 32], keys
    for p in packets:
        types = _nal_types(p.data)
        assert (7 in types and 8 in types) == p.keyframe, (p.n, types)  # SPS/PPS in front of every keyframe
    first = packets[0].data
    sps = first[first.index(b"\x00\x00\x01\x67") + 4:]
    assert sps[0] == 66 and sps[1] & 0x40, "not constrained baseline"
    assert b"subme=2 " in first and b"bframes=0" in first  # x264 veryfast, and no B-frames
    assert encoder.frames_encoded == 60 and encoder.name == "libx264"


def _series(text: str, name: str, session: str) -> float:
    prefix = f'{name}{{session="{session}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise KeyError(prefix)


async def test_talker_and_three_whep_viewers_share_one_encode(server_url, speech_wav):
    before = set(s["id"] for s in (await get_json(server_url + "/health"))["sessions"])
    talker = asyncio.ensure_future(talk(server_url, speech_wav, seconds=30))
    found: list[str] = []

    async def started() -> bool:
        sessions = (await get_json(server_url + "/health"))["sessions"]
        found[:] = [s["id"] for s in sessions if s["id"] not in before and s["kind"] == "ws"]
        return bool(found)

    viewers: list[WhepViewer] = []
    try:
        await wait_until(started, 60, "the talker's session")
        session_id = found[0]
        viewers = [WhepViewer(server_url, session_id, token=API_KEY) for _ in range(VIEWERS)]
        await asyncio.gather(*(v.start() for v in viewers))

        async def all_consuming() -> bool:
            return _series(await get_text(server_url + "/metrics"), "live_avatar_video_consumers",
                           session_id) == VIEWERS + 1

        await wait_until(all_consuming, 20, "four consumers of the encoded video")
        first = await get_text(server_url + "/metrics")
        sent_before = _series(first, "live_avatar_session_frames_sent_total", session_id)

        async def watched() -> bool:
            metrics = await get_text(server_url + "/metrics")
            return _series(metrics, "live_avatar_session_frames_sent_total", session_id) - sent_before >= WATCH_S * 25

        await wait_until(watched, 60, f"{WATCH_S * 25} more frames published")
        last = await get_text(server_url + "/metrics")
        stopped = time.time()
        assert _series(last, "live_avatar_video_consumers", session_id) == VIEWERS + 1
        sent = (_series(last, "live_avatar_session_frames_sent_total", session_id)
                - _series(first, "live_avatar_session_frames_sent_total", session_id))
        encoded = (_series(last, "live_avatar_session_frames_encoded_total", session_id)
                   - _series(first, "live_avatar_session_frames_encoded_total", session_id))
        # One encode per published frame with four consumers (not four); the scrape can straddle one frame.
        assert sent >= WATCH_S * 25 * 0.8, sent
        assert abs(encoded - sent) <= 2, (encoded, sent)
        info = next(s for s in (await get_json(server_url + "/health"))["sessions"] if s["id"] == session_id)
        assert info["encoder"]["consumers"] == VIEWERS + 1 and info["viewers"] == VIEWERS
        assert "H.264" in await _vp8_only_viewer(server_url, session_id)
        for viewer in viewers:
            await viewer.recorder.drain(stopped)
            assert len(viewer.recorder.video) >= WATCH_S * 25 * 0.8, len(viewer.recorder.video)
    finally:
        await asyncio.gather(*(v.stop() for v in viewers), return_exceptions=True)
        talker.cancel()
        await asyncio.gather(talker, return_exceptions=True)


async def _vp8_only_viewer(server_url: str, session_id: str) -> str:
    """A WHEP offer that accepts VP8 only: the server refuses it (400) and says why."""
    import aiohttp
    from aiortc import RTCRtpSender

    from cli.client import new_peer

    pc = new_peer()
    pc.addTransceiver("audio", direction="recvonly")
    transceiver = pc.addTransceiver("video", direction="recvonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType.lower() == "video/vp8"])
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server_url}/whep/{session_id}", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp", **AUTH}) as resp:
                assert resp.status == 400, resp.status
                return (await resp.json())["message"]
    finally:
        await pc.close()


async def test_a_receivers_picture_loss_indication_makes_the_shared_encoder_send_a_keyframe():
    """Two aiortc peers in this process: each PLI the receiver sends (0.6 s apart) yields one keyframe."""
    from aiortc import RTCPeerConnection

    from live.sinks.encoder import SharedAudioEncoder
    from live.sinks.tracks import AvatarVideoTrack, prefer_h264, route_keyframe_requests
    from tests.output_helpers import FlashSource

    source = FlashSource(25, 64, 64)
    encoder = SharedVideoEncoder(64, 64, 25, OutputSettings(keyframe_interval_s=60), ServerMetrics())
    tasks = [asyncio.ensure_future(c) for c in (source.run(), encoder.run(source), SharedAudioEncoder().run(source))]
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    received: list = []
    try:
        transceiver = sender.addTransceiver(AvatarVideoTrack(encoder), direction="sendonly")
        prefer_h264(transceiver)
        route_keyframe_requests(transceiver, encoder)
        receiver.on("track", lambda track: tasks.append(asyncio.ensure_future(_read(track, received))))
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        async def arrived() -> bool:
            return len(received) >= 10

        await wait_until(arrived, 30, "video to arrive")
        assert encoder.keyframes == 1  # the one the new sender asked for; the regular interval is 60 s
        ssrc = transceiver.sender._ssrc
        for expected in (2, 3, 4):
            await receiver.getTransceivers()[0].receiver._send_rtcp_pli(ssrc)

            async def served(expected: int = expected) -> bool:
                return encoder.keyframes >= expected

            await wait_until(served, 10, f"keyframe {expected} after a PLI")
        assert encoder.keyframes == 4
    finally:
        await asyncio.gather(sender.close(), receiver.close())
        source.close()
        for task in tasks:
            task.cancel()


async def _read(track, received: list) -> None:
    while True:
        received.append(await track.recv())
