"""WebRTC tracks of a session's output (thin adapters over :class:`SessionOutput`) and aiortc encoder settings."""

from __future__ import annotations

import fractions
import math

import av
from aiortc import MediaStreamTrack, RTCRtpSender, RTCRtpTransceiver
from aiortc import rtcrtpsender
from aiortc.codecs.h264 import H264Encoder
from aiortc.mediastreams import MediaStreamError

from .audio_feed import SAMPLE_RATE
from .output import OutputClosed, SessionOutput

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_PTIME = 0.02
AUDIO_CHUNK = round(SAMPLE_RATE * AUDIO_PTIME)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AUDIO_MAX_LATE_CHUNKS = 10
X264_PRESET = "veryfast"


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar video of one session: frame ``n`` is stamped ``n / fps`` on the session clock.

    The pump paces frames at the configured fps; aiortc's ``VideoStreamTrack`` would pace at its fixed 30 fps with a
    clock of its own.
    """

    kind = "video"

    def __init__(self, output: SessionOutput) -> None:
        """Read frames from ``output``."""
        super().__init__()
        self._output = output
        self._last = -1

    async def recv(self) -> av.VideoFrame:
        """The next published frame (frames are skipped, never queued, if this sink falls behind)."""
        if self.readyState != "live":
            raise MediaStreamError
        try:
            n, rgb = await self._output.next_frame(self._last)
        except OutputClosed:
            self.stop()
            raise MediaStreamError from None
        self._last = n
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = round(n * VIDEO_CLOCK_RATE / self._output.fps)
        frame.time_base = VIDEO_TIME_BASE
        return frame


class AvatarAudioTrack(MediaStreamTrack):
    """The session's input audio, delayed like the video: 20 ms chunks stamped and paced on the session clock."""

    kind = "audio"

    def __init__(self, output: SessionOutput) -> None:
        """Read audio from ``output``."""
        super().__init__()
        self._output = output
        self._chunk: int | None = None

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms chunk, released at its media time."""
        if self.readyState != "live" or self._output.closed:
            self.stop()
            raise MediaStreamError
        clock = self._output.clock
        due = math.ceil(clock.now() / AUDIO_PTIME)
        if self._chunk is None or due - self._chunk > AUDIO_MAX_LATE_CHUNKS:
            self._chunk = due
        await clock.sleep_until(self._chunk * AUDIO_PTIME)
        pcm = self._output.audio(self._chunk * AUDIO_PTIME, AUDIO_CHUNK)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._chunk * AUDIO_CHUNK
        frame.time_base = AUDIO_TIME_BASE
        self._chunk += 1
        return frame


class LowLatencyH264Encoder(H264Encoder):
    """aiortc's H.264 encoder with an explicit x264 preset and the session frame rate.

    aiortc leaves x264 at its default preset ("medium", about twice the CPU of "veryfast") and tells it 30 fps;
    it has no API for either (aiortc #980), so the sender's encoder factory is wrapped by :func:`configure_aiortc`.
    """

    preset = X264_PRESET
    fps = 25

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool):
        codec = self.codec
        if codec is None or (frame.width, frame.height) != (codec.width, codec.height) or (
            abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > 0.1
        ):
            self.buffer_data, self.buffer_pts = b"", None
            self.codec = av.CodecContext.create("libx264", "w")
            self.codec.width, self.codec.height = frame.width, frame.height
            self.codec.bit_rate = self.target_bitrate
            self.codec.pix_fmt = "yuv420p"
            self.codec.framerate = fractions.Fraction(self.fps, 1)
            self.codec.time_base = fractions.Fraction(1, self.fps)
            self.codec.options = {"preset": self.preset, "tune": "zerolatency", "level": "31"}
            self.codec.profile = "Baseline"
        yield from super()._encode_frame(frame, force_keyframe)


def configure_aiortc(fps: int) -> None:
    """Make every aiortc H.264 sender in this process use :class:`LowLatencyH264Encoder` at ``fps``."""
    LowLatencyH264Encoder.fps = fps
    original = rtcrtpsender.get_encoder
    if getattr(original, "low_latency", False):
        return

    def get_encoder(codec):
        if codec.mimeType.lower() == "video/h264":
            return LowLatencyH264Encoder()
        return original(codec)

    get_encoder.low_latency = True
    rtcrtpsender.get_encoder = get_encoder


def prefer_h264(transceiver: RTCRtpTransceiver) -> None:
    """Offer H.264 first (the encoder we tune), then VP8, keeping retransmission (RTX)."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    rank = {"video/h264": 0, "video/vp8": 1, "video/rtx": 2}
    transceiver.setCodecPreferences(sorted((c for c in codecs if c.mimeType.lower() in rank),
                                           key=lambda c: rank[c.mimeType.lower()]))
