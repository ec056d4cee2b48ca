"""WHIP ingest drives a session while a WHEP viewer watches it (both real aiortc peers over loopback)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cli.client import WhepViewer, WhipPublisher
from tests.server_helpers import get_json, session_ids, wait_until

LEAD_S = 2.0
HEARD_S = 3.0


async def test_whip_client_drives_a_session_that_a_whep_viewer_watches(server_url, speech_16k):
    # Silence first, so the viewer (which joins after the publisher) is watching when the speech comes through.
    lead = int(LEAD_S * 16000)
    publisher = WhipPublisher(server_url, np.concatenate([np.zeros(lead, np.float32), speech_16k]))
    await publisher.start()
    viewer = WhepViewer(server_url, publisher.session_id, token=publisher.view_token)
    try:
        health = await get_json(server_url + "/health")
        session = next(s for s in health["sessions"] if s["id"] == publisher.session_id)
        assert session["kind"] == "whip"
        await viewer.start()
        # Watch until the first seconds of speech have come back through the session's output delay.
        latency = await _output_delay(server_url, publisher.session_id)
        await asyncio.sleep(max(0.0, publisher.mic.spoken_at(lead) + latency + HEARD_S - time.time()))
        stopped = time.time()
        assert next(s for s in (await get_json(server_url + "/health"))["sessions"]
                    if s["id"] == publisher.session_id)["viewers"] == 1
    finally:
        viewer_status = await viewer.stop(received_until=time.time())
        publisher_status = await publisher.stop()
    report = viewer.recorder.report(speech_16k, lambda i: publisher.mic.spoken_at(lead + i), 25.0,
                                    viewer.connected_at, stopped)
    summary = report.summary()

    assert report.frames_ratio >= 0.9, summary
    assert report.audio_seconds > 0, summary
    # The publisher's speech reaches the viewer through the session (located by cross-correlation).
    assert report.audio_delay_s is not None, f"WHIP speech not found in what the WHEP viewer heard: {summary}"
    assert (viewer_status, publisher_status) == (200, 200)
    await wait_until(lambda: _gone(server_url, publisher.session_id), 10, "the WHIP session to end")


async def _output_delay(server_url: str, session_id: str) -> float:
    delay: list[float] = []

    async def known() -> bool:
        health = await get_json(server_url + "/health")
        session = next(s for s in health["sessions"] if s["id"] == session_id)
        delay[:] = [session["latency_s"]] if session["latency_s"] is not None else []
        return bool(delay)

    await wait_until(known, 60, "the session's output delay")
    return delay[0]


async def _gone(server_url: str, session_id: str) -> bool:
    return session_id not in await session_ids(server_url)


async def test_a_video_only_whep_viewer_gets_the_video(server_url, speech_16k):
    publisher = WhipPublisher(server_url, speech_16k)
    await publisher.start()
    viewer = WhepViewer(server_url, publisher.session_id, token=publisher.view_token, audio=False)
    try:
        await viewer.start()
        assert [t.kind for t in viewer.pc.getTransceivers()] == ["video"]

        async def frames_came() -> bool:
            return len(viewer.recorder.video) >= 25

        await wait_until(frames_came, 60, "a second of video at the video-only viewer")
    finally:
        assert await viewer.stop() == 200
        assert await publisher.stop() == 200
