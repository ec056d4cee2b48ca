"""GStreamer's webrtcbin, a third-party WebRTC stack with an RSA DTLS certificate, publishes over WHIP and plays the
session back over WHEP: the DTLS handshake succeeds (the server answers ``setup:passive``), H.264 frames decode and
the published tone comes back as audio."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

GST_PEER = Path(__file__).resolve().parents[1] / "gst_peer.py"
SYSTEM_PYTHON = Path("/usr/bin/python3")
PLAY_S = 4.0
FPS = 25


def _missing() -> str | None:
    """Why the GStreamer peer cannot run here, or None."""
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} is missing (GStreamer's Python bindings are Debian's python3-gst-1.0)"
    check = subprocess.run([str(SYSTEM_PYTHON), str(GST_PEER), "--check"], capture_output=True, text=True)
    if check.returncode != 0:
        return f"{check.stderr.strip()} (scripts/setup_env.sh test installs them as root)"
    return None


async def test_gstreamer_webrtcbin_publishes_over_whip_and_plays_over_whep(server_url):
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    proc = await asyncio.create_subprocess_exec(str(SYSTEM_PYTHON), str(GST_PEER), server_url, "--seconds",
                                                str(PLAY_S), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    whip, whep = report.get("whip", {}), report.get("whep", {})
    summary = json.dumps(report)
    assert whip.get("status") == 201 and whip.get("connected"), summary
    assert whep.get("status") == 201 and whep.get("connected"), summary
    assert whep["frames"] >= 0.7 * FPS * PLAY_S, summary
    assert whep["size"][0] > 0 and whep["size"][1] > 0, summary
    assert whep["audio_s"] >= 0.7 * PLAY_S and whep["audio_rms"] > 0.05, summary
    assert whep["errors"] == [] and whip["errors"] == [], summary
    assert (whep["delete"], whip["delete"]) == (200, 200), summary
