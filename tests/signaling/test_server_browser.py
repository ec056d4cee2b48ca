"""Headless Chromium (Debian's, with a fake microphone playing a speech WAV) on the talk and viewer pages."""

from __future__ import annotations

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
from tests.server_helpers import session_ids, wait_until

pytestmark = [pytest.mark.browser, NEEDS_CHROMIUM]


async def test_talk_page_start_plays_the_avatar_and_shows_stats(server_url, speech_wav):
    async with talk_page(server_url, speech_wav) as page:
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
        assert (await page.text_content("#st-size")).startswith("192×192 at 25 fps")  # the tiny profile's pinned size
        assert await page.evaluate("!document.getElementById('avatar').paused")
        await page.screenshot(path=str(ARTIFACTS / "talk_page.png"))
        # The viewer link the talk page shows carries the session's view token: another page can watch with it.
        link = await page.get_attribute("#view-link", "href")
        assert link.startswith(f"/view/{session_id}?token={session_id}.view."), link
        viewer = await page.context.browser.new_page()
        await viewer.goto(server_url + link + "&quiet=1")
        await viewer.wait_for_function(f"{DECODED} > 25", timeout=60_000)
        await viewer.close()
        await page.click("#stop")
        assert (await page.text_content("#st-state")) == "idle"

    async def gone() -> bool:
        return session_id not in await session_ids(server_url)

    await wait_until(gone, 10, "the browser's session to end after Stop")


async def test_viewer_page_plays_a_whip_session(server_url, speech_wav, speech_16k):
    async with viewer_of_whip_session(server_url, speech_wav, np.concatenate([speech_16k] * 3),
                                      {"width": 640, "height": 640}) as page:
        await page.wait_for_function(f"{DECODED} > 50", timeout=120_000)
        await page.wait_for_function(SHOWS_AVATAR, timeout=60_000, polling=200)
        await page.screenshot(path=str(ARTIFACTS / "viewer_page.png"))
