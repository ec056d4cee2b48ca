"""Media files through PyAV: decoding any audio to 16 kHz mono, and an MP4 writer for H.264 + AAC."""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from model.audio_features import SAMPLE_RATE


class MediaError(ValueError):
    """An audio/video file could not be read or written."""


def _open_audio(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{path}: not a readable audio file ({exc})") from exc
    if not container.streams.audio:
        container.close()
        raise MediaError(f"{path}: contains no audio stream")
    return container


def audio_info(path: Path) -> tuple[int, int, float | None]:
    """(sample rate, channels, duration in seconds or None) of the first audio stream."""
    with _open_audio(path) as container:
        stream = container.streams.audio[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        return stream.rate or stream.codec_context.sample_rate, stream.codec_context.channels, duration


def iter_audio(path: Path) -> Iterator[tuple[av.AudioFrame, np.ndarray]]:
    """Decode an audio file frame by frame: yields (original frame, 16 kHz mono float32 samples)."""
    container = _open_audio(path)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    try:
        for frame in container.decode(audio=0):
            pcm = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            yield frame, (np.concatenate(pcm) if pcm else np.zeros(0, np.float32))
        tail = [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        if tail:
            yield None, np.concatenate(tail)
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: audio could not be decoded ({exc})") from exc
    finally:
        container.close()


def read_audio_16k(path: Path) -> np.ndarray:
    """Whole file as 16 kHz mono float32 (for tests and short clips)."""
    parts = [pcm for _, pcm in iter_audio(path)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class Mp4Writer:
    """Writes H.264 video (+ optional AAC audio) to ``<out>.partial`` and renames on :meth:`close`.

    On :meth:`abort` (or any exception inside a ``with`` block) the partial file is removed, so a failed run
    never leaves a half-written output behind.
    """

    def __init__(self, out: Path, width: int, height: int, fps: int, audio_rate: int | None,
                 audio_layout: str = "stereo", preset: str = "veryfast") -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.codec_context.time_base = Fraction(1, fps)
        self.video.options = {"preset": preset, "crf": "20"}
        self.audio = None
        if audio_rate is not None:
            self.audio = self.container.add_stream("aac", rate=audio_rate, layout=audio_layout)
            self.resampler = av.AudioResampler(format="fltp", layout=audio_layout, rate=audio_rate)
        self.frames = 0

    def write_video(self, rgb: np.ndarray) -> None:
        """Append one ``[H, W, 3]`` uint8 frame."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self.video.encode(frame):
            self.container.mux(packet)

    def write_audio(self, frame: av.AudioFrame) -> None:
        """Append decoded audio (any format; resampled to the stream's)."""
        for f in self.resampler.resample(frame):
            f.pts = None
            for packet in self.audio.encode(f):
                self.container.mux(packet)

    def close(self) -> Path:
        """Flush encoders, close and atomically move the file into place."""
        for packet in self.video.encode(None):
            self.container.mux(packet)
        if self.audio is not None:
            for f in self.resampler.resample(None):
                for packet in self.audio.encode(f):
                    self.container.mux(packet)
            for packet in self.audio.encode(None):
                self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the file is removed either way
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
