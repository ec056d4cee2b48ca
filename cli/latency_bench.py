"""Glass-to-glass latency through a real server: audio sample spoken → the frame showing it received.

A server runs in a child process; an aiortc talker on loopback streams speech as its microphone and measures,
for every generated frame it receives, the time from when the first audio sample that frame shows was "spoken"
(captured by a live mic) to when the decoded frame arrived. Used by ``live-avatar bench --server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import IO

import numpy as np

from cli.client import talk
from cli.server_process import ServerProcess
from cli.speech import speechlike, write_wav
from live.settings import Settings

SPEECH = ("Hello, I am a live avatar. I speak whatever you say, in real time, for as long as you like. "
          "Every syllable you hear should meet my lips at the same moment.")


def _speech_wav(folder: Path, seconds: float) -> Path:
    """Real synthetic speech (espeak-ng) if installed, else speech-like syllables; at least ``seconds`` long."""
    out = folder / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-s", "170", "-w", str(out), SPEECH], check=True, capture_output=True)
        return out
    write_wav(out, speechlike(seconds))
    return out


def run_latency_bench(settings: Settings, seconds: float, sessions: int = 1, server_log: Path | None = None) -> dict:
    """Serve ``settings``, talk to it from ``sessions`` clients at once for ``seconds`` and return the measurements
    (latencies in ms; with several sessions each key is prefixed by the session's number). The server's output
    goes to ``server_log`` if given."""
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(server_log, "w")) if server_log is not None else None
        return _run(settings, seconds, sessions, log)


def _run(settings: Settings, seconds: float, sessions: int, log: IO[str] | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="live-avatar-g2g-") as tmp, ServerProcess(settings, log) as url:
        wav = _speech_wav(Path(tmp), seconds)
        with urllib.request.urlopen(url + "/health") as resp:
            before = json.loads(resp.read())

        async def talk_all() -> list:
            return await asyncio.gather(*(talk(url, wav, seconds=seconds) for _ in range(sessions)))

        results = asyncio.run(talk_all())
        with urllib.request.urlopen(url + "/health") as resp:
            health = json.loads(resp.read())
    worker = health["workers"][0]
    out = {
        "config": settings.name,
        "device": worker["device"],
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "realtime": worker.get("realtime"),
        "block_s (server estimate)": worker["block_s"],
        "GPU memory GiB at start / end": f"{before['workers'][0].get('gpu_memory_gib')} / "
                                          f"{worker.get('gpu_memory_gib')}",
        "event-loop lag p99 ms (server, last minute)": health.get("event_loop_lag_p99_ms"),
    }
    for i, result in enumerate(results):
        prefix = f"[{i + 1}] " if sessions > 1 else ""
        out.update({prefix + k: v for k, v in _session_summary(result).items()})
    return out


def _session_summary(result) -> dict:
    """One session's measurements from what its client recorded and the server's last stats message."""
    report = result.report
    stats = [m for m in result.server_messages if m.get("type") == "stats"]
    last = stats[-1] if stats else {}
    g2g = np.asarray(report.glass_to_glass_s) * 1000
    return {
        "seconds": round(report.seconds, 1),
        "server output delay ms": None if last.get("latency_s") is None else round(last["latency_s"] * 1000),
        "glass-to-glass p50 ms": round(float(np.percentile(g2g, 50))) if g2g.size else None,
        "glass-to-glass p95 ms": round(float(np.percentile(g2g, 95))) if g2g.size else None,
        "fresh frames measured": int(g2g.size),
        "audio delay ms": None if report.audio_delay_s is None else round(report.audio_delay_s * 1000),
        "A/V offset ms": None if report.av_offset_s is None else round(report.av_offset_s * 1000, 1),
        "frames received / expected": f"{report.video_frames} / {report.expected_frames}",
        "frames repeated / sent (server)": f"{last.get('frames_repeated')} / {last.get('frames_sent')}",
        "silence inserted s (late mic packets)": last.get("silence_filled_s"),
        "input withheld from a late engine, frames": last.get("frames_withheld"),
    }
