"""The RTMP push's child process: ``python -m live.sinks.rtmp_worker`` muxes one connection's FLV with PyAV.

FFmpeg's RTMP client can hold the GIL for as long as a peer that accepts and never answers keeps it waiting (the
output open has no interrupt callback), so the server never runs it in its own process: each connection of a push
is one of these workers, which the server kills when it hangs.

Protocol on stdin (the server writes, :func:`encode_message` frames it): a ``CONFIG`` message (JSON: url, fps,
width, height, audio sample rate and chunk duration, AAC bitrate), then ``VIDEO`` (frame number, keyframe flag,
annex-B access unit) and ``AUDIO`` (chunk index, s16 mono PCM) messages until stdin closes. PyAV connects when the
first packet is muxed (the FLV header needs the first keyframe's parameter sets), so that is when the worker
reports ``{"state": "live"}`` on stdout (JSON lines); ``{"error": "..."}`` (the detail, for the server log) comes
before it exits non-zero.

Timestamps come from the session clock: video frame ``n`` is ``n / fps`` and audio chunk ``i`` is
``i * chunk_s``, both relative to the first keyframe of the connection, so the two stay in sync however late
either arrives. This module imports only PyAV and NumPy: a worker starts in a fraction of a second.
"""

from __future__ import annotations

import ctypes
import fractions
import json
import signal
import struct
import sys
from typing import BinaryIO

import av
import numpy as np

CONFIG, VIDEO, AUDIO = 1, 2, 3
HEADER = struct.Struct("<BBqI")  # kind, flags (1 = keyframe), frame number / chunk index, payload bytes
MS = fractions.Fraction(1, 1000)
AAC_RATE = 48000
IO_TIMEOUT_S = 5.0
NAL_SPS, NAL_PPS = 7, 8
PR_SET_PDEATHSIG = 1


def encode_message(kind: int, number: int = 0, payload: bytes = b"", keyframe: bool = False) -> bytes:
    """One framed message for the worker's stdin."""
    return HEADER.pack(kind, int(keyframe), number, len(payload)) + payload


def parameter_sets(access_unit: bytes) -> bytes:
    """The SPS and PPS NAL units (annex-B) of a keyframe: the FLV stream's decoder configuration."""
    out = []
    for nal in access_unit.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01"):
        nal = nal.rstrip(b"\x00")
        if nal and nal[0] & 0x1F in (NAL_SPS, NAL_PPS):
            out.append(b"\x00\x00\x00\x01" + nal)
    return b"".join(out)


class _Closed(Exception):
    """The server closed stdin: the push stops."""


def _read(stream: BinaryIO) -> tuple[int, bool, int, bytes]:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise _Closed
    kind, flags, number, size = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise _Closed
    return kind, bool(flags & 1), number, payload


def _report(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class FlvMuxer:
    """One FLV connection: the first keyframe's parameter sets configure the video, then every packet is muxed."""

    def __init__(self, config: dict) -> None:
        """Prepare the push to ``config["url"]``; the connection opens with the first muxed packet."""
        self.fps = int(config["fps"])
        self.size = (int(config["width"]), int(config["height"]))
        self.rate = int(config["sample_rate"])
        self.chunk_s = float(config["chunk_s"])
        self.audio_bitrate = int(config["audio_bitrate"])
        self.container = av.open(config["url"], "w", format="flv", timeout=(IO_TIMEOUT_S, IO_TIMEOUT_S))
        self.t0: float | None = None
        self._audio_next: int | None = None

    def video(self, n: int, keyframe: bool, data: bytes) -> bool:
        """Mux video frame ``n`` (the first one connects and blocks until the RTMP server takes the publish);
        frames before the first keyframe are skipped. True if the frame was muxed."""
        if self.t0 is None:
            if not keyframe:
                return False
            self._start(n, data)
        packet = av.Packet(data)
        packet.stream = self.vstream
        packet.pts = packet.dts = round((n / self.fps - self.t0) * 1000)
        packet.time_base = MS
        packet.is_keyframe = keyframe
        self.container.mux(packet)
        return True

    def audio(self, index: int, pcm: bytes) -> None:
        """Encode audio chunk ``index`` to AAC and mux it (chunks before the first keyframe are skipped)."""
        if self.t0 is None or index * self.chunk_s < self.t0:
            return
        if self._audio_next != index:  # a gap: start the resampler afresh rather than splice across it
            self.resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AAC_RATE,
                                               frame_size=self.astream.codec_context.frame_size or 1024)
        self._audio_next = index + 1
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = round((index * self.chunk_s - self.t0) * self.rate)
        frame.time_base = fractions.Fraction(1, self.rate)
        for out in self.resampler.resample(frame):
            for packet in self.astream.encode(out):
                self.container.mux(packet)

    def _start(self, n: int, keyframe: bytes) -> None:
        self.t0 = n / self.fps
        self.vstream = self.container.add_stream("h264", rate=self.fps)
        self.vstream.width, self.vstream.height = self.size
        self.vstream.time_base = MS
        self.vstream.codec_context.extradata = parameter_sets(keyframe)
        self.astream = self.container.add_stream("aac", rate=AAC_RATE, layout="stereo")
        self.astream.codec_context.bit_rate = self.audio_bitrate

    def close(self) -> None:
        """Write the trailer and close the connection."""
        self.container.close()


def _die_with_parent() -> None:
    """Have the kernel kill this worker if the server dies (Linux), even while FFmpeg blocks in C."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run(stdin: BinaryIO) -> int:
    """Push one connection from ``stdin``'s messages; returns the exit code."""
    kind, _, _, payload = _read(stdin)
    if kind != CONFIG:
        _report(error="protocol error: the first message must be the configuration")
        return 2
    muxer = FlvMuxer(json.loads(payload))
    live = False
    try:
        while True:
            kind, keyframe, number, payload = _read(stdin)
            if kind == VIDEO:
                if muxer.video(number, keyframe, payload) and not live:
                    live = True
                    _report(state="live")
            elif kind == AUDIO:
                muxer.audio(number, payload)
    except _Closed:
        muxer.close()  # a clean stop: write the trailer
        return 0


def main() -> int:
    """Entry point of ``python -m live.sinks.rtmp_worker``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    _die_with_parent()
    try:
        return run(sys.stdin.buffer)
    except _Closed:
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the server, which reconnects
        _report(error=f"{exc.__class__.__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
