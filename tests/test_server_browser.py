"""Headless Chromium (Debian's, with a fake microphone playing a speech WAV) on the talk and viewer pages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from live.client import WhipPublisher

from tests.conftest import ARTIFACTS
from tests.server_helpers import session_ids, wait_until

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]

DECODED = "document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames"
# True once the video shows generated content rather than the plain pre-roll frame (pixel spread > 6 levels).
SHOWS_AVATAR = """(() => {
  const v = document.getElementById('avatar');
  if (!v.videoWidth) return false;
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(v, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += y; sq += y * y; n++; }
  return Math.sqrt(sq / n - (sum / n) ** 2) > 6;
})()"""


async def _browser(playwright, wav: Path):
    return await playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
    ])


async def test_talk_page_start_plays_the_avatar_and_shows_stats(server_url, speech_wav):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await _browser(p, speech_wav)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server_url + "/")
            await page.click("#start")
            await page.wait_for_function("document.getElementById('st-state').textContent === 'connected'",
                                         timeout=120_000)
            first = await page.evaluate(DECODED)
            await page.wait_for_function(f"{DECODED} > {first} + 50", timeout=60_000)
            await page.wait_for_function(SHOWS_AVATAR, timeout=60_000, polling=200)
            await page.wait_for_function("document.getElementById('st-fps').textContent !== '–'", timeout=10_000)
            session_id = (await page.text_content("#st-session")).strip()
            assert session_id in await session_ids(server_url)
            assert "s" in await page.text_content("#st-latency")
            assert await page.evaluate("!document.getElementById('avatar').paused")
            await page.screenshot(path=str(ARTIFACTS / "talk_page.png"))
            await page.click("#stop")
            assert (await page.text_content("#st-state")) == "idle"
            assert errors == []
        finally:
            await browser.close()

    async def gone() -> bool:
        return session_id not in await session_ids(server_url)

    await wait_until(gone, 10, "the browser's session to end after Stop")


async def test_viewer_page_plays_a_whip_session(server_url, speech_wav, speech_16k):
    from playwright.async_api import async_playwright

    publisher = WhipPublisher(server_url, np.concatenate([speech_16k] * 3))
    await publisher.start()
    try:
        async with async_playwright() as p:
            browser = await _browser(p, speech_wav)
            try:
                page = await browser.new_page(viewport={"width": 640, "height": 640})
                await page.goto(f"{server_url}/view/{publisher.session_id}")
                await page.wait_for_function(f"{DECODED} > 50", timeout=120_000)
                await page.wait_for_function(SHOWS_AVATAR, timeout=60_000, polling=200)
                await page.screenshot(path=str(ARTIFACTS / "viewer_page.png"))
            finally:
                await browser.close()
    finally:
        assert await publisher.stop() == 200
