"""Voice to mouth in a real browser (``live-avatar bench --server --browser``, and tests/signaling).

Headless Debian Chromium opens the talk page with a fake microphone playing held-out speech (voices and texts no
training stage used) with pauses, and the page measures, on one clock (``performance.now()``): the microphone's
level every 10 ms, and for every video frame it shows (``requestVideoFrameCallback``, at its expected display time)
how open the built-in character's mouth is (:func:`train.synthetic.mouth_openness`'s measure, in the browser).
Each speech onset's delay is the time to the first shown frame where the mouth opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from cli.server_process import ServerProcess
from live.settings import Settings
from train import synthetic as syn

RATE = 22050  # espeak-ng's own rate
PAUSE_S = 1.6
OPEN = 0.15  # measured openness that counts as an open mouth
CHROMIUM = Path("/usr/bin/chromium")

# Keeps the page's microphone stream (window.__mic) for the probe.
CAPTURE_MIC = """() => {
  const orig = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => { const s = await orig(c); window.__mic = s; return s; };
}"""
PROBE = """([box, full, interior]) => {
  window.__levels = []; window.__mouth = [];
  const ctx = new AudioContext();
  const an = ctx.createAnalyser(); an.fftSize = 512;
  ctx.createMediaStreamSource(window.__mic).connect(an);
  const buf = new Float32Array(512);
  setInterval(() => {
    an.getFloatTimeDomainData(buf);
    let s = 0; for (const v of buf) s += v * v;
    window.__levels.push([performance.now(), 10 * Math.log10(s / buf.length + 1e-10)]);
  }, 10);
  const video = document.getElementById('avatar');
  const canvas = document.createElement('canvas');
  const g = canvas.getContext('2d', { willReadFrequently: true });
  const [x0, y0, x1, y1] = box;
  const onFrame = (now, meta) => {
    canvas.width = video.videoWidth; canvas.height = video.videoHeight;
    g.drawImage(video, 0, 0);
    const d = g.getImageData(x0, y0, x1 - x0, y1 - y0).data;
    let dark = 0;
    for (let i = 0; i < d.length; i += 4) {
      const dr = d[i] - interior[0], dg = d[i + 1] - interior[1], db = d[i + 2] - interior[2];
      if (dr * dr + dg * dg + db * db < 2500) dark++;
    }
    window.__mouth.push([meta.expectedDisplayTime, dark / (d.length / 4) / full, video.videoWidth]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}"""


def held_out_wav(folder: Path) -> Path:
    """:data:`train.synthetic.HELD_OUT_SPEECH`, each utterance after :data:`PAUSE_S` of silence, as one WAV."""
    pause = np.zeros(int(PAUSE_S * RATE), np.int16)
    parts = []
    for i, (voice, text) in enumerate(syn.HELD_OUT_SPEECH):
        path = folder / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            parts += [pause, np.frombuffer(w.readframes(w.getnframes()), np.int16)]
    out = folder / "held_out.wav"
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.concatenate(parts + [pause]).tobytes())
    return out


def voice_to_mouth(levels: np.ndarray, mouth: np.ndarray, after: float) -> list[float]:
    """Seconds from each speech onset (mic level above -40 dBFS after ≥ 0.5 s below -50) later than ``after`` to
    the first shown frame whose mouth opens (open, after a closed frame: a mouth still moving for the previous
    utterance does not count); onsets whose mouth does not open within 2.5 s count as 2.5 s.

    ``levels``: rows (ms, dBFS); ``mouth``: rows (ms, openness, …), both on the page's clock."""
    t, db = levels[:, 0] / 1000, levels[:, 1]
    ft, opening = mouth[:, 0] / 1000, mouth[:, 1]
    quiet_since = None
    delays = []
    for ti, v in zip(t, db):
        if v < -50:
            quiet_since = ti if quiet_since is None else quiet_since
            continue
        if v <= -40:  # on the way up (or down): neither quiet nor speech
            continue
        if quiet_since is not None and ti - quiet_since >= 0.5 and ti > after and ti < ft[-1] - 2.5:
            opens = np.nonzero((ft[1:] >= ti) & (ft[1:] <= ti + 2.5) & (opening[1:] > OPEN) & (opening[:-1] <= OPEN))[0]
            delays.append(float(ft[opens[0] + 1] - ti) if opens.size else 2.5)
        quiet_since = None
    return delays


async def measure_on_talk_page(page, seconds: float, character: syn.Character = syn.BUILTIN[0]) -> dict:
    """On a loaded talk page whose microphone :data:`CAPTURE_MIC` keeps: pick ``character``, start, measure for
    ``seconds``, stop. Returns the report (delays, p50/p95, what the page shows) with the raw ``levels``/``mouth``."""
    x0, y0, x1, y1 = character.mouth_box()
    full = (np.pi / 4) * character.mouth_width * character.max_open / ((x1 - x0) * (y1 - y0))
    await page.click(f"#images button[data-image='{character.name}']")
    await page.click("#start")
    await page.wait_for_function("document.getElementById('st-state').textContent === 'connected'", timeout=120_000)
    await page.evaluate(PROBE, [[x0, y0, x1, y1], full, list(syn.MOUTH_INTERIOR)])
    started = await page.evaluate("performance.now()") / 1000
    await page.wait_for_timeout(seconds * 1000)
    shown = await page.text_content("#st-latency")
    repeated = await page.text_content("#st-repeated")
    levels = np.array(await page.evaluate("window.__levels"))
    mouth = np.array(await page.evaluate("window.__mouth"))
    await page.click("#stop")
    delays = voice_to_mouth(levels, mouth, after=started + 2.0)
    measured = re.match(r"([0-9.]+) s voice → mouth, measured", shown or "")
    server = re.search(r"server ([0-9.]+) s", shown or "")
    return {
        "onsets": len(delays), "voice_to_mouth_ms": [round(d * 1000) for d in delays],
        "p50_ms": round(float(np.median(delays)) * 1000) if delays else None,
        "p95_ms": round(float(np.percentile(delays, 95)) * 1000) if delays else None,
        "page_shows": shown, "page_measured_s": float(measured[1]) if measured else None,
        "server_delay_s": float(server[1]) if server else None, "frames_repeated": repeated,
        "frame_sizes": sorted({int(w) for w in mouth[:, 2]}) if mouth.size else [],
        "frames_shown": int(mouth.shape[0]), "levels": levels, "mouth": mouth,
    }


def chromium_args(wav: Path) -> list[str]:
    """Headless Chromium's flags: ``wav`` as the microphone, autoplay allowed, no GPU emulation."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--disable-gpu",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]


async def run_browser_bench(url: str, seconds: float) -> dict:
    """Measure voice to mouth on the talk page of the server at ``url`` (Debian Chromium via Playwright)."""
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (run_tests.sh does)")
    with tempfile.TemporaryDirectory(prefix="live-avatar-v2m-") as tmp:
        wav = held_out_wav(Path(tmp))
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 720})
                await page.add_init_script(f"({CAPTURE_MIC})()")
                await page.goto(url + "/")
                return await measure_on_talk_page(page, seconds)
            finally:
                await browser.close()


def run_voice_to_mouth_bench(settings: Settings, seconds: float, server_log: Path | None = None) -> dict:
    """Serve ``settings`` and measure voice to mouth from Chromium's talk page for ``seconds``; the report without
    the raw traces, plus the host and date."""
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(server_log, "w")) if server_log is not None else None
        url = stack.enter_context(ServerProcess(settings, log))
        report = asyncio.run(run_browser_bench(url, seconds))
    for raw in ("levels", "mouth"):
        report.pop(raw)
    return {"date": time.strftime("%Y-%m-%d"), "host": f"{platform.machine()}, {os.cpu_count()} CPUs", **report}
