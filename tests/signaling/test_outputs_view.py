"""The viewer page as an OBS browser source would use it: chosen background, frame filled, and it reconnects by
itself when its connection is dropped (headless Debian Chromium, a real WHIP session)."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from tests.browser_helpers import (
    DECODED,
    NEEDS_CHROMIUM,
    SHOWS_AVATAR,
    talk_page,
    viewer_of_whip_session,
)
from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, NEEDS_CHROMIUM]


async def test_viewer_page_fills_the_frame_with_its_background_and_reconnects(server_url, speech_wav, speech_16k):
    async with viewer_of_whip_session(server_url, speech_wav, np.concatenate([speech_16k] * 4),
                                      {"width": 640, "height": 360}, "?bg=00ff00&fit=cover&quiet=1") as page:
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


@pytest.mark.rtmp
async def test_talk_page_pushes_to_rtmp_and_shows_its_status(server_url, speech_wav, nginx_rtmp):
    async with talk_page(server_url, speech_wav) as page:
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
