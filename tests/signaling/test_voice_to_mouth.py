"""Voice to mouth in a real browser: headless Chromium talks to the server with a fake microphone playing held-out
speech, and the delay from each speech onset at the page's microphone to the first shown video frame in which the
avatar's mouth opens is measured from the frames the page shows (cli/voice_to_mouth.py).

The talk page's own figure (``#st-latency``) must be consistent with it: the page measures the lag of the avatar's
voice, which the server sends lip-synced with the video.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.voice_to_mouth import CAPTURE_MIC, held_out_wav, measure_on_talk_page, voice_to_mouth
from tests.browser_helpers import NEEDS_CHROMIUM, talk_page
from tests.conftest import ARTIFACTS
from train import synthetic as syn

MAX_P95_S = 2.5  # a regression bound (measured: bench/RESULTS.md, "Voice to mouth"), not the 0.8 s target


def test_onsets_count_openings_not_a_mouth_still_moving():
    t = np.arange(0, 10_000, 10.0)
    speech = ((t >= 3000) & (t < 4000)) | ((t >= 6000) & (t < 7000))
    levels = np.stack([t, np.where(speech, -20.0, -70.0)], axis=1)
    ft = np.arange(0, 10_000, 40.0)
    # the mouth opens 0.5 s after the first onset and is still open at the second, then opens again 0.8 s later
    opening = np.where(((ft >= 3500) & (ft < 6100)) | ((ft >= 6800) & (ft < 7600)), 0.5, 0.0)
    mouth = np.stack([ft, opening, np.full_like(ft, 192)], axis=1)
    assert voice_to_mouth(levels, mouth, after=0) == pytest.approx([0.5, 0.8], abs=0.04)  # frames every 40 ms


@pytest.mark.browser
@NEEDS_CHROMIUM
async def test_voice_to_mouth_in_chromium(server_url, tmp_path):
    wav = held_out_wav(tmp_path)
    async with talk_page(server_url, wav, init_script=CAPTURE_MIC) as page:
        report = await measure_on_talk_page(page, 45)
    np.savez_compressed(ARTIFACTS / "voice_to_mouth.npz", mic_db=report.pop("levels"), mouth=report.pop("mouth"))
    print(json.dumps(report))
    (ARTIFACTS / "voice_to_mouth.json").write_text(json.dumps(report, indent=1))
    assert report["frames_shown"] > 25 * 30, "the page showed too few video frames"
    assert report["frame_sizes"] == [syn.SIZE], "the received video is not the character's size"
    assert report["onsets"] >= 8, report
    assert report["page_measured_s"] is not None, f"the talk page shows no measured latency: {report['page_shows']}"
    # The page's figure is the lag of the avatar's voice, which leaves the server with the frames it is lip-synced
    # to: at least the server's own delay, and never later than the mouth shown.
    assert report["server_delay_s"] <= report["page_measured_s"] <= report["p50_ms"] / 1000 + 0.1, report
    # The target is p95 ≤ 0.8 s; on 2 cores beside Chromium the tiny engine is not real time yet, so this
    # bound only guards against losing what there is.
    assert report["p95_ms"] / 1000 <= MAX_P95_S, report
