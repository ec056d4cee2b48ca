"""Receiving side of a test/bench peer: records a session's video and audio to MP4 and measures A/V sync.

Timing comes from the stream itself: each received frame's RTP timestamp is mapped to the sender's wall clock
through RTCP sender reports — what a browser uses to lip-sync — and compared with when the client "spoke" the
audio the frame shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.clock import datetime_from_ntp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtcpSrPacket

from live.stream.output import PREROLL_RGB
from model.audio_features import SAMPLE_RATE

VIDEO_RATE = 90000
AUDIO_RATE = 48000
UNIFORM_STD = 6.0
PREROLL_GRAY = 0.299 * PREROLL_RGB[0] + 0.587 * PREROLL_RGB[1] + 0.114 * PREROLL_RGB[2]
PREROLL_MARGIN = 10.0
REPEAT_DIFF = 0.5
MIN_CORRELATION = 0.3
LOCATE_S = 1.0


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class SenderClock:
    """Maps a received track's timestamps to the sender's wall clock using its RTCP sender reports.

    aiortc keeps sender reports and the RTP timestamp origin private (aiortc #901 asks for an API), so this reads
    them from the receiver: the SR handler is wrapped and the receiver's timestamp origin is looked up.
    """

    def __init__(self, receiver: RTCRtpReceiver, rate: int) -> None:
        """Start collecting sender reports of ``receiver`` (clock ``rate`` Hz)."""
        self.rate = rate
        self._receiver = receiver
        self.reports: deque[tuple[float, int]] = deque(maxlen=256)
        original = receiver._handle_rtcp_packet

        async def handle(packet) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                self.reports.append((datetime_from_ntp(info.ntp_timestamp).timestamp(), info.rtp_timestamp))
            await original(packet)

        receiver._handle_rtcp_packet = handle

    def wall(self, pts: int) -> float | None:
        """Sender wall time of a received frame's ``pts`` (relative to the first frame), or None without reports."""
        origin = self._receiver._RTCRtpReceiver__timestamp_mapper._origin
        if origin is None or not self.reports:
            return None
        raw = origin + pts
        return float(np.median([ntp + _signed32(raw - rtp) / self.rate for ntp, rtp in self.reports]))


@dataclass
class VideoSample:
    """One received video frame: pts (1/90000 s, relative), arrival wall time, whether it has content (is not the
    server's plain pre-roll frame) and whether it is fresh (differs from the previous frame, i.e. not a repeat)."""

    pts: int
    arrival: float
    has_content: bool
    fresh: bool


@dataclass
class SyncReport:
    """What a peer received and how well it lines up with what it sent.

    ``video_frames`` counts the frames the sender sent between ``started`` and ``stopped`` (its clock, from RTCP
    sender reports) that arrived, so a client that falls behind in processing does not count as loss.
    """

    seconds: float
    fps: float
    video_frames: int
    expected_frames: int
    audio_seconds: float
    size: tuple[int, int] | None
    av_offset_s: float | None
    audio_delay_s: float | None
    longest_gap_s: float | None = None
    first_frame_s: float | None = None
    glass_to_glass_s: list[float] = field(default_factory=list)

    @property
    def frames_ratio(self) -> float:
        """Received / expected video frames."""
        return self.video_frames / self.expected_frames if self.expected_frames else 0.0

    def percentile(self, q: float) -> float | None:
        """A percentile of the glass-to-glass latency (seconds)."""
        return float(np.percentile(self.glass_to_glass_s, q)) if self.glass_to_glass_s else None

    def summary(self) -> dict:
        """The report as plain numbers."""
        return {
            "seconds": round(self.seconds, 2), "video_frames": self.video_frames,
            "expected_frames": self.expected_frames, "frames_ratio": round(self.frames_ratio, 3),
            "audio_seconds": round(self.audio_seconds, 2), "size": self.size,
            "longest_gap_ms": _ms(self.longest_gap_s), "first_frame_ms": _ms(self.first_frame_s),
            "av_offset_ms": None if self.av_offset_s is None else round(self.av_offset_s * 1000, 1),
            "audio_delay_ms": None if self.audio_delay_s is None else round(self.audio_delay_s * 1000, 1),
            "glass_to_glass_p50_ms": _ms(self.percentile(50)), "glass_to_glass_p95_ms": _ms(self.percentile(95)),
            "glass_to_glass_frames": len(self.glass_to_glass_s),
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


class Recorder:
    """Consumes the remote audio and video tracks of a peer connection.

    Video is encoded to a temporary MP4 as it arrives; audio is kept (48 kHz mono int16, placed by timestamp, at
    most ``max_seconds``); :meth:`save` muxes both into the output, aligned on the sender's clock.
    """

    def __init__(self, max_seconds: float, work_path: Path | None = None) -> None:
        """Keep at most ``max_seconds`` of audio; encode video next to ``work_path`` (None: no video file)."""
        self.video: list[VideoSample] = []
        self.audio = np.zeros(int(max_seconds * AUDIO_RATE), np.int16)
        self.audio_end = 0
        self.audio_arrivals: list[tuple[int, float]] = []
        self.video_clock: SenderClock | None = None
        self.audio_clock: SenderClock | None = None
        self.size: tuple[int, int] | None = None
        self._video_tmp = None if work_path is None else work_path.with_name(work_path.name + ".video.partial.mp4")
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._tasks: list[asyncio.Task] = []
        self._first_video_arrival: float | None = None
        self._first_audio_arrival: float | None = None

    def attach(self, pc: RTCPeerConnection) -> None:
        """Start reading every remote track of ``pc`` (call after the remote description is set)."""
        for transceiver in pc.getTransceivers():
            receiver, track = transceiver.receiver, transceiver.receiver.track
            if track is None or transceiver.currentDirection not in ("recvonly", "sendrecv"):
                continue
            if track.kind == "video":
                self.video_clock = SenderClock(receiver, VIDEO_RATE)
                self._tasks.append(asyncio.ensure_future(self._read_video(track)))
            else:
                self.audio_clock = SenderClock(receiver, AUDIO_RATE)
                self._tasks.append(asyncio.ensure_future(self._read_audio(track)))

    async def drain(self, until: float, timeout: float = 5.0) -> None:
        """Wait until the frames the sender sent up to wall time ``until`` have been read (a busy client may lag)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.video[-1] if self.video else None
            sent = None if last is None or self.video_clock is None else self.video_clock.wall(last.pts)
            if sent is not None and sent >= until:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop reading."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read_video(self, track: MediaStreamTrack) -> None:
        prev: np.ndarray | None = None
        try:
            while True:
                frame = await track.recv()
                arrival = time.time()
                gray = frame.to_ndarray(format="gray").astype(np.float32)
                fresh = prev is None or float(np.abs(gray - prev).mean()) > REPEAT_DIFF
                content = float(gray.std()) > UNIFORM_STD or abs(float(gray.mean()) - PREROLL_GRAY) > PREROLL_MARGIN
                self.video.append(VideoSample(frame.pts, arrival, content, fresh))
                prev = gray
                self.size = (frame.width, frame.height)
                self._encode(frame)
        except MediaStreamError:
            pass

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                arrival = time.time()
                channels = len(frame.layout.channels)
                pcm = frame.to_ndarray().reshape(-1, channels).mean(axis=1)
                first = frame.pts
                stop = min(first + pcm.shape[0], self.audio.shape[0])
                if first < stop:
                    self.audio[first:stop] = pcm[: stop - first].astype(np.int16)
                    self.audio_end = max(self.audio_end, stop)
                self.audio_arrivals.append((first, arrival))
        except MediaStreamError:
            pass

    def _encode(self, frame: av.VideoFrame) -> None:
        if self._video_tmp is None:
            return
        if self._container is None:
            self._container = av.open(str(self._video_tmp), mode="w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=25)
            self._stream.width, self._stream.height, self._stream.pix_fmt = frame.width, frame.height, "yuv420p"
            self._stream.time_base = Fraction(1, VIDEO_RATE)
            self._stream.codec_context.time_base = Fraction(1, VIDEO_RATE)
            self._stream.options = {"preset": "veryfast", "crf": "20"}
        frame.time_base = Fraction(1, VIDEO_RATE)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def save(self, out: Path) -> Path:
        """Write the received video and audio to ``out`` (MP4: H.264 + AAC), aligned on the sender's clock."""
        out = Path(out)
        tmp = out.with_name(out.name + ".partial")
        try:
            if self._container is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
                self._container.close()
                self._container = None
            v0 = self._start_wall(self.video_clock, self.video[0].arrival if self.video else None)
            a0 = self._start_wall(self.audio_clock, self.audio_arrivals[0][1] if self.audio_arrivals else None)
            t0 = min(t for t in (v0, a0) if t is not None) if (v0 or a0) else 0.0
            have_video = self._video_tmp is not None and self._video_tmp.exists() and v0 is not None
            with av.open(str(tmp), mode="w", format="mp4") as dst:
                src = av.open(str(self._video_tmp)) if have_video else None
                try:
                    vout = dst.add_stream_from_template(src.streams.video[0]) if src is not None else None
                    aout = dst.add_stream("aac", rate=AUDIO_RATE, layout="mono") if a0 is not None else None
                    if src is not None:
                        vin = src.streams.video[0]
                        shift = round((v0 - t0) / vin.time_base)
                        for packet in src.demux(vin):
                            if packet.dts is None:
                                continue
                            packet.pts += shift
                            packet.dts += shift
                            packet.stream = vout
                            dst.mux(packet)
                    if aout is not None:
                        self._write_audio(dst, aout, round((a0 - t0) * AUDIO_RATE))
                finally:
                    if src is not None:
                        src.close()
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
            if self._video_tmp is not None:
                self._video_tmp.unlink(missing_ok=True)
        return out

    def _write_audio(self, dst: av.container.OutputContainer, stream: av.AudioStream, lead: int) -> None:
        pcm = np.concatenate([np.zeros(max(lead, 0), np.int16), self.audio[: self.audio_end]])
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE, frame_size=1024)
        step = AUDIO_RATE // 10
        for i in range(0, pcm.shape[0], step):
            frame = av.AudioFrame.from_ndarray(pcm[i : i + step].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = AUDIO_RATE
            for f in resampler.resample(frame):
                f.pts = None
                for packet in stream.encode(f):
                    dst.mux(packet)
        for f in resampler.resample(None):
            f.pts = None
            for packet in stream.encode(f):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)

    @staticmethod
    def _start_wall(clock: SenderClock | None, first_arrival: float | None) -> float | None:
        """Sender wall time of pts 0 (arrival time of the first frame when no sender report came)."""
        wall = clock.wall(0) if clock is not None else None
        return wall if wall is not None else first_arrival

    def report(self, sent: np.ndarray, spoken_at, fps: float, started: float, stopped: float) -> SyncReport:
        """Measure against the sent audio: ``sent`` (16 kHz float32), ``spoken_at(sample) -> wall time``.

        - A/V offset: sender time of the first generated frame (the first with content after the plain pre-roll;
          it shows the first input sample) minus sender time of that sample in the returned audio, located by
          cross-correlation with what was sent.
        - audio delay: when the client spoke sample 0 → when it came back.
        - glass-to-glass, per fresh frame (repeats of a late frame are left out) from the first generated one on:
          when the first sample it shows was spoken → when the frame arrived. Frame ``k`` shows input sample
          ``k * 16000 / fps``; that holds while the server inserted no silence (its ``silence_filled_s`` stat).
        """
        seconds = stopped - started
        window = [v for v in self.video if started <= self._sent_at(v) <= stopped]
        report = SyncReport(seconds=seconds, fps=fps, video_frames=len(window),
                            expected_frames=round(seconds * fps), audio_seconds=self.audio_end / AUDIO_RATE,
                            size=self.size, av_offset_s=None, audio_delay_s=None)
        if window:
            report.first_frame_s = window[0].arrival - started
            report.longest_gap_s = max((b.arrival - a.arrival for a, b in zip(window, window[1:])), default=None)
        first = next((v for v in self.video if v.has_content), None)
        lag = self._locate(sent)
        frame_ticks = VIDEO_RATE / fps
        samples_per_frame = SAMPLE_RATE / fps
        if first is not None:
            report.glass_to_glass_s = [
                v.arrival - spoken_at(round((v.pts - first.pts) / frame_ticks) * samples_per_frame)
                for v in self.video if v.pts >= first.pts and v.fresh
            ]
        if lag is not None:
            arrival = next((t for pts, t in self.audio_arrivals if pts <= lag * 3 < pts + 960), None)
            report.audio_delay_s = None if arrival is None else arrival - spoken_at(0)
            if first is not None and self.video_clock is not None and self.audio_clock is not None:
                v_wall, a_wall = self.video_clock.wall(first.pts), self.audio_clock.wall(lag * 3)
                if v_wall is not None and a_wall is not None:
                    report.av_offset_s = v_wall - a_wall
        return report

    def _sent_at(self, frame: VideoSample) -> float:
        """When the sender sent a frame (its arrival time if no sender report came)."""
        wall = self.video_clock.wall(frame.pts) if self.video_clock is not None else None
        return frame.arrival if wall is None else wall

    def _locate(self, sent: np.ndarray) -> int | None:
        """Where (16 kHz samples from the audio track's start) the sent audio begins in the received audio.

        Only the start of the sent audio (up to ``LOCATE_S`` past its first sound) is matched, so silence the
        server inserts later, when mic packets are late, cannot pull the match away from sample 0.
        """
        n16 = self.audio_end // 3
        loud = np.flatnonzero(np.abs(sent) > 0.01)
        if n16 == 0 or loud.size == 0:
            return None
        sent = sent[: loud[0] + int(LOCATE_S * SAMPLE_RATE)]
        received = self.audio[: n16 * 3].astype(np.float32).reshape(-1, 3).mean(axis=1) / 32768.0
        size = 1 << int(np.ceil(np.log2(received.size + sent.size)))
        corr = np.fft.irfft(np.fft.rfft(received, size) * np.conj(np.fft.rfft(sent, size)), size)[: received.size]
        lag = int(np.argmax(corr))
        segment = received[lag : lag + sent.size]
        ref = sent[: segment.size]
        denom = float(np.linalg.norm(segment) * np.linalg.norm(ref))
        if denom == 0 or float(np.dot(segment, ref)) / denom < MIN_CORRELATION:
            return None
        return lag
