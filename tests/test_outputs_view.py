"""The viewer page as an OBS browser source would use it: chosen background, frame filled, and it reconnects by
itself when its connection is dropped (headless Debian Chromium, a real WHIP session)."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from live.client import WhipPublisher

from tests.conftest import ARTIFACTS
from tests.test_server_browser import CHROMIUM, DECODED, SHOWS_AVATAR, _browser

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]


async def test_viewer_page_fills_the_frame_with_its_background_and_reconnects(server_url, speech_wav, speech_16k):
    from playwright.async_api import async_playwright

    publisher = WhipPublisher(server_url, np.concatenate([speech_16k] * 4))
    await publisher.start()
    try:
        async with async_playwright() as p:
            browser = await _browser(p, speech_wav)
            try:
                page = await browser.new_page(viewport={"width": 640, "height": 360})
                await page.goto(f"{server_url}/view/{publisher.session_id}?bg=00ff00&fit=cover&quiet=1")
                await page.wait_for_function(f"{DECODED} > 25", timeout=120_000)
                await page.wait_for_function(SHOWS_AVATAR, timeout=60_000, polling=200)
                style = await page.evaluate("""(() => {
                  const v = getComputedStyle(document.getElementById('avatar'));
                  return [getComputedStyle(document.body).backgroundColor, v.objectFit, v.width, v.height];
                })()""")
                assert style == ["rgb(0, 255, 0)", "cover", "640px", "360px"], style
                await page.screenshot(path=str(ARTIFACTS / "viewer_page_cover.png"))
                # The server drops this viewer; the page notices and comes back on a new WHEP resource.
                first = await page.evaluate("resource")
                async with aiohttp.ClientSession() as http:
                    async with http.delete(server_url + first) as resp:
                        assert resp.status == 200
                await page.wait_for_function(f"resource && resource !== {first!r}", timeout=60_000)
                frames = await page.evaluate(DECODED)
                await page.wait_for_function(f"{DECODED} > {frames} + 25", timeout=60_000)
                assert await page.evaluate("document.getElementById('note').hidden")
            finally:
                await browser.close()
    finally:
        assert await publisher.stop() == 200


@pytest.mark.rtmp
async def test_talk_page_pushes_to_rtmp_and_shows_its_status(server_url, speech_wav, nginx_rtmp):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await _browser(p, speech_wav)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server_url + "/")
            await page.fill("#rtmp-url", nginx_rtmp.url("talk"))
            await page.click("#rtmp-toggle")
            assert await page.text_content("#st-rtmp") == "starts with the session"
            await page.click("#start")
            await page.wait_for_function("document.getElementById('st-rtmp').textContent.startsWith('live')",
                                         timeout=120_000)
            assert "/live/***" in await page.text_content("#st-rtmp")
            await page.screenshot(path=str(ARTIFACTS / "talk_page_rtmp.png"))
            await page.click("#rtmp-toggle")
            await page.wait_for_function("document.getElementById('st-rtmp').textContent === 'off'", timeout=10_000)
            await page.click("#stop")
            assert errors == []
        finally:
            await browser.close()
