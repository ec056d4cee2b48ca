"""``live-avatar bench --soak N``: N back-to-back sessions against a real server, and what each leaves behind.

A server runs in a child process (:class:`~cli.server_process.ServerProcess`). One aiortc talker after another
opens a session over ``/ws``, streams speech-like audio as its microphone while it receives the avatar for a few
seconds, and says bye; once ``/health`` lists no session any more, the server process's resident memory, thread
count and open file descriptors are read from ``/proc/PID``. A server that frees everything a session held shows
flat threads and fds and an RSS that stops growing after the first sessions (allocator pools, lazily built caches
and thread pools warm up once).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli.client import talk
from cli.server_process import ServerProcess
from cli.speech import speechlike, write_wav
from live.settings import Settings

SETTLE_TIMEOUT_S = 30.0
SETTLE_SAMPLES = 3
SETTLE_STEP_S = 0.1


@dataclass(frozen=True)
class ProcessSample:
    """What a process holds at one moment: resident memory, threads and open file descriptors."""

    rss_mb: float
    threads: int
    fds: int


def sample_process(pid: int) -> ProcessSample:
    """Read ``/proc/PID`` (Linux): VmRSS, Threads and the entries of ``fd/``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return ProcessSample(rss_mb=int(fields["VmRSS"][0]) / 1024, threads=int(fields["Threads"][0]),
                         fds=len(os.listdir(f"/proc/{pid}/fd")))


async def settled_sample(pid: int) -> ProcessSample:
    """The process once its last session's loose ends are gone: fewest threads and fds over ``SETTLE_SAMPLES``
    reads ``SETTLE_STEP_S`` apart (a socket the client is still closing is not a leak; a leak stays), latest RSS."""
    samples = []
    for _ in range(SETTLE_SAMPLES):
        await asyncio.sleep(SETTLE_STEP_S)
        samples.append(sample_process(pid))
    return ProcessSample(samples[-1].rss_mb, min(s.threads for s in samples), min(s.fds for s in samples))


@dataclass
class SoakResult:
    """Per-session samples (index 0: before the first session) and their summary after warm-up."""

    samples: list[ProcessSample]
    warmup: int
    seconds_per_session: float

    @property
    def steady(self) -> list[ProcessSample]:
        """The samples after the warm-up sessions."""
        return self.samples[self.warmup:]

    @property
    def rss_mb_per_session(self) -> float:
        """Least-squares slope of RSS over the sessions after warm-up (MB per session)."""
        steady = self.steady
        if len(steady) < 2:
            return 0.0
        return float(np.polyfit(np.arange(len(steady)), [s.rss_mb for s in steady], 1)[0])

    def table(self) -> str:
        """One row per session: RSS, its change, threads and fds of the server process."""
        rows = ["| after session | RSS MB | Δ RSS MB | threads | fds |", "|---|---|---|---|---|"]
        previous = None
        for i, s in enumerate(self.samples):
            delta = "" if previous is None else f"{s.rss_mb - previous.rss_mb:+.2f}"
            rows.append(f"| {i if i else 'start'} | {s.rss_mb:.1f} | {delta} | {s.threads} | {s.fds} |")
            previous = s
        return "\n".join(rows)

    def summary(self) -> str:
        """RSS growth per session after warm-up and the ranges of threads and fds."""
        steady = self.steady
        threads = sorted({s.threads for s in steady})
        fds = sorted({s.fds for s in steady})
        return (f"{len(self.samples) - 1} sessions of {self.seconds_per_session:g} s; after {self.warmup - 1} warm-up "
                f"session(s): RSS {self.rss_mb_per_session:+.3f} MB/session (least squares), "
                f"{steady[0].rss_mb:.1f} → {steady[-1].rss_mb:.1f} MB; threads {threads[0]}–{threads[-1]}; "
                f"fds {fds[0]}–{fds[-1]}")


def _session_count(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        health = json.loads(resp.read())
    return health["session_count"] if "session_count" in health else len(health["sessions"])


async def _settled(url: str) -> None:
    """Wait until the server lists no session (the last one has freed its engine and peers)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while await asyncio.to_thread(_session_count, url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"a session was still listed {SETTLE_TIMEOUT_S:g} s after its talker left")
        await asyncio.sleep(0.1)


async def _soak(url: str, pid: int, wav: Path, sessions: int, seconds: float) -> list[ProcessSample]:
    samples = [await settled_sample(pid)]
    for i in range(sessions):
        result = await talk(url, wav, seconds=seconds)
        if result.report.video_frames == 0:
            raise RuntimeError(f"session {i + 1} received no video")
        await _settled(url)
        samples.append(await settled_sample(pid))
    return samples


def run_soak(settings: Settings, sessions: int, seconds: float = 2.0, warmup: int = 4) -> SoakResult:
    """Serve ``settings`` and run ``sessions`` talker sessions of ``seconds`` one after another; the summary
    leaves out the samples before session ``warmup``."""
    server = ServerProcess(settings)
    with tempfile.TemporaryDirectory(prefix="live-avatar-soak-") as tmp, server as url:
        wav = Path(tmp) / "speech.wav"
        write_wav(wav, speechlike(seconds + 1.0))
        samples = asyncio.run(_soak(url, server.pid, wav, sessions, seconds))
    return SoakResult(samples, min(warmup, sessions), seconds)
