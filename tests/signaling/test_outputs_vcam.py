"""Virtual camera: without a v4l2loopback device it is a clear error, and a session asked to use one runs anyway."""

from __future__ import annotations

import numpy as np
import pytest

from cli.client import WhipPublisher
from cli.server_process import ServerProcess
from live.settings import load_settings
from live.sinks.vcam import VirtualCameraError, loopback_devices, open_camera
from tests.conftest import ARTIFACTS
from tests.server_helpers import get_json, wait_until

pytestmark = pytest.mark.skipif(bool(loopback_devices()), reason="this machine has a v4l2loopback device")
DEVICE = "/dev/video10"


def test_virtual_camera_without_a_loopback_device_is_a_clear_error():
    with pytest.raises(VirtualCameraError) as err:
        open_camera(DEVICE, 192, 192, 25)
    message = str(err.value)
    assert DEVICE in message and "modprobe v4l2loopback" in message and "docs/outputs.md" in message


async def test_a_session_whose_virtual_camera_cannot_open_still_streams(speech_16k):
    settings = load_settings("configs/tiny.yaml")
    settings = settings.model_copy(update={"output": settings.output.model_copy(update={"vcam_device": DEVICE})})
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "server-vcam.log", "w") as log, ServerProcess(settings, log=log) as url:
        publisher = WhipPublisher(url, np.concatenate([speech_16k] * 2))
        await publisher.start()
        try:
            info: dict = {}

            async def streaming() -> bool:
                info.update(next(s for s in (await get_json(url + "/health"))["sessions"]
                                 if s["id"] == publisher.session_id))
                return info["frames_sent"] > 50

            await wait_until(streaming, 60, "the session to stream")
            assert info["vcam"]["state"] == "error" and "v4l2loopback" in info["vcam"]["error"], info["vcam"]
        finally:
            assert await publisher.stop() == 200
