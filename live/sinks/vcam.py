"""Virtual camera sink (pip extra ``[vcam]``): a session's video on a v4l2loopback device, through pyvirtualcam.

Video calls (Meet, Zoom, Teams) then pick the avatar like a webcam. It is video only: the voice needs a virtual
audio device of its own (docs/outputs.md). ``pyvirtualcam.Camera.send`` may block, so frames go to a thread that
always sends the newest one. Machines without v4l2loopback (Windows, macOS, containers) use the OBS route in
docs/outputs.md instead.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import sys
import threading

import numpy as np

from live.stream.output import SessionOutput

log = logging.getLogger(__name__)

LOOPBACK_SYSFS = "/sys/devices/virtual/video4linux/video*"
HOWTO = ("load v4l2loopback (sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=LiveAvatar "
         "exclusive_caps=1) or, without it, use the OBS virtual camera route in docs/outputs.md")


class VirtualCameraError(RuntimeError):
    """The virtual camera cannot be used; the message says what to install or load."""


def loopback_devices() -> list[str]:
    """The v4l2loopback devices of this machine (``/dev/videoN``)."""
    return sorted("/dev/" + os.path.basename(p) for p in glob.glob(LOOPBACK_SYSFS))


def open_camera(device: str, width: int, height: int, fps: int):
    """A ``pyvirtualcam.Camera`` on ``device`` taking RGB frames; raises :class:`VirtualCameraError` if the device
    is not a v4l2loopback device, pyvirtualcam is missing, or the device does not open (e.g. in use)."""
    if sys.platform.startswith("linux") and device not in loopback_devices():
        found = ", ".join(loopback_devices()) or "none"
        raise VirtualCameraError(f"{device} is not a v4l2loopback device (loopback devices here: {found}); {HOWTO}")
    try:
        import pyvirtualcam
    except ImportError:
        raise VirtualCameraError("pyvirtualcam is not installed: pip install 'live-avatar[vcam]'") from None
    try:
        return pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device)
    except Exception as exc:  # pyvirtualcam raises RuntimeError/ValueError per backend
        raise VirtualCameraError(f"cannot open virtual camera {device}: {exc}") from exc


class VirtualCamera:
    """Shows every frame of a session's output on a virtual camera (opened at construction)."""

    def __init__(self, device: str, width: int, height: int, fps: int) -> None:
        """Open ``device``; raises :class:`VirtualCameraError` when it cannot be used."""
        self.device = device
        self._camera = open_camera(device, width, height, fps)
        self._frames: queue.Queue[np.ndarray | None] = queue.Queue(1)
        self._thread = threading.Thread(target=self._send_forever, name=f"vcam {device}", daemon=True)

    async def run(self, output: SessionOutput) -> None:
        """Hand the output's frames to the camera thread until the output ends."""
        self._thread.start()
        try:
            async for _, rgb in output.frames():
                self._put(rgb)
        finally:
            self._put(None)

    def _put(self, item: np.ndarray | None) -> None:
        try:
            self._frames.get_nowait()
        except queue.Empty:
            pass
        self._frames.put_nowait(item)

    def _send_forever(self) -> None:
        try:
            while (rgb := self._frames.get()) is not None:
                self._camera.send(rgb)
        except Exception:  # noqa: BLE001 - a broken camera ends the camera, never the session
            log.exception("virtual camera %s failed", self.device)
        finally:
            self._camera.close()
