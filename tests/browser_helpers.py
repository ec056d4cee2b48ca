"""Headless Debian Chromium for the page tests: a fake microphone playing a speech WAV, page probes, the talk page,
and a viewer page watching a real WHIP session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from cli.client import WhipPublisher
from cli.voice_to_mouth import CHROMIUM, chromium_args

NEEDS_CHROMIUM = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="Debian chromium is not installed at /usr/bin/chromium")

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


async def launch_browser(playwright, wav: Path):
    """Debian Chromium, headless, with ``wav`` as its microphone and autoplay allowed."""
    return await playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))


@asynccontextmanager
async def viewer_of_whip_session(server_url: str, wav: Path, voice: np.ndarray, viewport: dict[str, int],
                                 query: str = "") -> AsyncIterator:
    """A WHIP session driven by ``voice`` (16 kHz) and a page of the given size on its viewer link (the view token
    from the WHIP response) with ``query`` (``?…``) added.

    Yields the page; on exit the browser closes and the session's WHIP resource is deleted (asserting 200).
    """
    from playwright.async_api import async_playwright

    publisher = WhipPublisher(server_url, voice)
    await publisher.start()
    try:
        async with async_playwright() as p:
            browser = await launch_browser(p, wav)
            try:
                page = await browser.new_page(viewport=viewport)
                extra = f"&{query.removeprefix('?')}" if query else ""
                await page.goto(f"{server_url}/view/{publisher.session_id}?token={publisher.view_token}{extra}")
                yield page
            finally:
                await browser.close()
    finally:
        assert await publisher.stop() == 200


@asynccontextmanager
async def talk_page(server_url: str, wav: Path, init_script: str | None = None) -> AsyncIterator:
    """The talk page at 1280×720 with ``wav`` as the microphone (and ``init_script``, a JavaScript function's
    source, run before the page's own scripts); yields the page.

    On a clean exit it asserts the page raised no JavaScript errors; the browser closes either way.
    """
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await launch_browser(p, wav)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            if init_script is not None:
                await page.add_init_script(f"({init_script})()")
            await page.goto(server_url + "/")
            yield page
            assert errors == []
        finally:
            await browser.close()
