"""One encode per session: the output's video is encoded to H.264 once and its audio to Opus once, and the packets
are fanned out to every consumer (the talker's and each WHEP viewer's WebRTC senders, the RTMP push).

The H.264 stream is what WebRTC browsers decode: constrained baseline, no B-frames, annex-B with SPS/PPS in front of
every keyframe, x264 ``tune=zerolatency``. A keyframe comes every ``keyframe_interval_s`` and whenever a consumer
asks for one (a new consumer, a receiver's PLI/FIR, a consumer that dropped packets); requests are rate-limited to
one keyframe per ``KEYFRAME_MIN_INTERVAL_S`` and a request inside that interval is served when it ends.

Video is encoded on a thread of its own (x264 takes milliseconds per frame, more than the event loop may block),
fed through a queue of ``ENCODE_QUEUE`` frames that drops the oldest frame when the encoder falls behind. Opus at
20 ms is cheap (well under a millisecond), so the audio pump encodes on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import av
import numpy as np

from live.metrics import ServerMetrics
from live.settings import OutputSettings
from live.stream.output import SessionOutput
from model.audio_features import SAMPLE_RATE

log = logging.getLogger(__name__)

AUDIO_PTIME = 0.02
AUDIO_CHUNK = round(SAMPLE_RATE * AUDIO_PTIME)
AUDIO_MAX_LATE_CHUNKS = 10
OPUS_BITRATE = 32000
ENCODE_QUEUE = 8
KEYFRAME_MIN_INTERVAL_S = 0.5
BITS_PER_PIXEL = 0.1
LEVEL_31_MACROBLOCKS = 3600

T = TypeVar("T")


@dataclass(frozen=True)
class VideoPacket:
    """One encoded frame: output frame ``n`` (media time ``n / fps``) as an annex-B access unit."""

    n: int
    data: bytes
    keyframe: bool


@dataclass(frozen=True)
class AudioChunk:
    """20 ms of output audio: chunk ``index`` (media time ``index * 0.02`` s) as PCM and as one Opus packet."""

    index: int
    pcm: np.ndarray
    opus: bytes


class Fanout(Generic[T]):
    """Hands every published item to every subscriber's callback, on the event loop thread."""

    def __init__(self) -> None:
        """No subscribers yet."""
        self._subscribers: list[Callable[[T], None]] = []

    def subscribe(self, deliver: Callable[[T], None]) -> Callable[[], None]:
        """Call ``deliver(item)`` for each item from now on; returns the function that unsubscribes."""
        self._subscribers.append(deliver)
        return lambda: self._subscribers.remove(deliver) if deliver in self._subscribers else None

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, item: T) -> None:
        """Deliver ``item`` to every subscriber."""
        for deliver in list(self._subscribers):
            deliver(item)


def default_bitrate(width: int, height: int, fps: int) -> int:
    """Bits per second for ``width``×``height`` at ``fps``: ``BITS_PER_PIXEL`` per pixel per frame."""
    return int(BITS_PER_PIXEL * width * height * fps)


def open_h264(width: int, height: int, fps: int, options: OutputSettings, device: str = "cpu") -> av.CodecContext:
    """An open H.264 encoder with WebRTC-safe low-latency settings.

    ``options.encoder`` "auto" tries NVENC (``h264_nvenc``) when the session runs on a CUDA device and falls back to
    libx264 if it does not open (H100/H200/A100 have no NVENC); "libx264" and "h264_nvenc" force one.
    """
    gop = max(1, round(options.keyframe_interval_s * fps))
    bitrate = options.video_kbps * 1000 if options.video_kbps else default_bitrate(width, height, fps)
    names = {"auto": ["h264_nvenc", "libx264"] if device.startswith("cuda") else ["libx264"],
             "libx264": ["libx264"], "h264_nvenc": ["h264_nvenc"]}[options.encoder]
    errors = []
    for name in names:
        ctx = av.CodecContext.create(name, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.framerate = fractions.Fraction(fps, 1)
        ctx.time_base = fractions.Fraction(1, fps)
        ctx.bit_rate = bitrate
        ctx.gop_size = gop
        ctx.max_b_frames = 0
        if name == "libx264":
            level = "31" if math.ceil(width / 16) * math.ceil(height / 16) <= LEVEL_31_MACROBLOCKS else "41"
            ctx.options = {"preset": options.x264_preset, "tune": "zerolatency", "level": level,
                           "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            ctx.profile = "Baseline"
        else:
            ctx.options = {"preset": "p1", "tune": "ull", "zerolatency": "1", "profile": "baseline"}
        try:
            ctx.open()
            return ctx
        except (av.FFmpegError, ValueError) as exc:
            errors.append(f"{name}: {exc}")
            log.info("H.264 encoder %s unavailable (%s)", name, exc)
    raise RuntimeError("no H.264 encoder could be opened: " + "; ".join(errors))


class SharedVideoEncoder:
    """Encodes a session's output video once, on its own thread, for every subscriber.

    :meth:`run` reads the output's frames (as any sink does) and queues them for the encoder thread while there are
    subscribers; encoded packets come back to the loop and are published to :attr:`packets`.
    """

    def __init__(self, width: int, height: int, fps: int, options: OutputSettings, metrics: ServerMetrics,
                 device: str = "cpu") -> None:
        """Open the encoder for ``width``×``height`` at ``fps`` (raises ``RuntimeError`` if none opens)."""
        self.fps = fps
        self.width, self.height = width, height
        self.codec: av.CodecContext | None = open_h264(width, height, fps, options, device)
        self.name = self.codec.name
        self.packets: Fanout[VideoPacket] = Fanout()
        self.frames_encoded = 0
        self.frames_dropped = 0
        self.keyframes = 0
        self._metrics = metrics
        self._queue: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(ENCODE_QUEUE)
        self._want_key = True
        self._key_gap = max(1, round(KEYFRAME_MIN_INTERVAL_S * fps))
        self._last_key = -self._key_gap
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._encode_forever, name="h264-encoder", daemon=True)
        self.released: concurrent.futures.Future[None] = concurrent.futures.Future()

    def request_keyframe(self) -> None:
        """Ask for a keyframe (a new consumer, PLI/FIR); served at the next frame the rate limit allows."""
        self._want_key = True

    async def run(self, output: SessionOutput) -> None:
        """Feed the output's frames to the encoder until the output ends."""
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        try:
            async for n, rgb in output.frames():
                if not self.packets:
                    self._want_key = True
                    continue
                try:
                    self._queue.put_nowait((n, rgb))
                except queue.Full:
                    self._drop_oldest((n, rgb))
        finally:
            self.close()

    def close(self) -> None:
        """Stop the encoder thread and free the codec — x264's threads and buffers — as soon as it has finished
        its frame (idempotent; :attr:`released` completes then). Nothing waits for the garbage collector."""
        if self._closed:
            return
        self._closed = True
        if self._thread.ident is None:
            self._release()
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self._drop_oldest(None)

    def _release(self) -> None:
        self.codec = None
        self.released.set_result(None)

    def _drop_oldest(self, item: tuple[int, np.ndarray] | None) -> None:
        try:
            dropped = self._queue.get_nowait()
        except queue.Empty:
            dropped = None
        if dropped is not None:
            # A frame that was never encoded breaks no reference: receivers just see a longer frame interval.
            self.frames_dropped += 1
            self._metrics.frames_encode_dropped.inc()
        self._queue.put_nowait(item)

    def encode(self, n: int, rgb: np.ndarray) -> list[VideoPacket]:
        """Encode output frame ``n`` now (the encoder thread's work; the benchmark calls it directly)."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = n
        if self._want_key and n - self._last_key >= self._key_gap:
            self._want_key = False
            frame.pict_type = av.video.frame.PictureType.I
        out = []
        for packet in self.codec.encode(frame):
            if packet.is_keyframe:
                self._last_key = int(packet.pts)
                self.keyframes += 1
            out.append(VideoPacket(int(packet.pts), bytes(packet), packet.is_keyframe))
        self.frames_encoded += 1
        return out

    def _encode_forever(self) -> None:
        try:
            self._encode_until_closed()
        finally:
            self._release()

    def _encode_until_closed(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            start = time.perf_counter()
            try:
                packets = self.encode(*item)
            except Exception:  # noqa: BLE001 - one bad frame must not end the session's video
                log.exception("H.264 encode failed")
                continue
            self._metrics.frames_encoded.inc()
            self._metrics.encode_seconds.observe(time.perf_counter() - start)
            try:
                for packet in packets:
                    self._loop.call_soon_threadsafe(self.packets.publish, packet)
            except RuntimeError:  # the event loop closed while the server shut down
                return


class SharedAudioEncoder:
    """Paces a session's output audio in 20 ms chunks on its clock and encodes each chunk to Opus once.

    Chunk ``i`` is released at media time ``i * 0.02`` s, as the video frame of that media time is; a pump that
    wakes late by more than ``AUDIO_MAX_LATE_CHUNKS`` jumps to the present instead of bursting.
    """

    def __init__(self) -> None:
        """Open the Opus encoder (16 kHz mono in, 20 ms packets; RTP carries it at 48 kHz as always for Opus)."""
        self.codec: av.CodecContext | None = av.CodecContext.create("libopus", "w")
        self.codec.sample_rate = SAMPLE_RATE
        self.codec.layout = "mono"
        self.codec.format = "s16"
        self.codec.bit_rate = OPUS_BITRATE
        self.codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self.codec.options = {"application": "voip", "frame_duration": str(round(AUDIO_PTIME * 1000))}
        self.codec.open()
        self.chunks: Fanout[AudioChunk] = Fanout()

    async def run(self, output: SessionOutput) -> None:
        """Publish one chunk every 20 ms of the session clock until the output ends."""
        clock = output.clock
        chunk: int | None = None
        try:
            while not output.closed:
                due = math.ceil(clock.now() / AUDIO_PTIME)
                if chunk is None or due - chunk > AUDIO_MAX_LATE_CHUNKS:
                    chunk = due
                await clock.sleep_until(chunk * AUDIO_PTIME)
                if self.chunks:
                    pcm = output.audio(chunk * AUDIO_PTIME, AUDIO_CHUNK)
                    self.chunks.publish(AudioChunk(chunk, pcm, self._opus(chunk, pcm)))
                chunk += 1
        finally:
            self.codec = None  # freed now, not when a collection finds the session's peers

    def _opus(self, index: int, pcm: np.ndarray) -> bytes:
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * AUDIO_CHUNK
        return b"".join(bytes(p) for p in self.codec.encode(frame))
