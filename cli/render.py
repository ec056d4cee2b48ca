"""Offline render: image + speech file → MP4 (H.264 25 fps + the input audio as AAC), streamed block by block.

Uses the same :class:`~live.engine.stream.StreamEngine` as the server. Memory stays flat however long the audio is:
audio is decoded, pushed, generated and encoded incrementally.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cli.media import MediaError, Mp4Writer, audio_info, iter_audio
from live.engine.stream import ProfileStack, StreamEngine
from live.images import default_character, load_image
from live.settings import Settings
from model.audio_features import SAMPLE_RATE


@dataclass
class RenderResult:
    """What a render produced."""

    out: Path
    frames: int
    audio_seconds: float
    width: int
    height: int


def render(settings: Settings, image: Path | None, audio: Path, out: Path, seed: int | None = None,
           prompt: str = "", progress: bool = True, stack: ProfileStack | None = None) -> RenderResult:
    """Render ``audio`` spoken by the face in ``image`` (None = built-in character) into ``out``.

    Raises :class:`~live.images.ImageError` / :class:`~cli.media.MediaError` with a message naming the file;
    no partial output is left behind on failure.
    """
    img = load_image(image) if image is not None else default_character()
    rate, channels, duration = audio_info(audio)
    out = Path(out)
    if not out.parent.is_dir():
        raise MediaError(f"{out}: output folder {out.parent} does not exist")
    stack = stack or ProfileStack.from_settings(settings)
    engine = StreamEngine(stack, seed)
    engine.start(img, prompt)
    fps = engine.fps
    expected = round(duration * fps) if duration else None
    bar = tqdm(total=expected, unit="frame", desc="render", disable=not progress)
    writer = Mp4Writer(out, engine.width, engine.height, fps, rate, "mono" if channels == 1 else "stereo")
    pushed = written = 0

    def drain(limit: int | None) -> None:
        nonlocal written
        while (frame := engine.ring.get_nowait()) is not None:
            if limit is None or written < limit:
                writer.write_video(frame.numpy())
                written += 1
                bar.update(1)

    try:
        with writer:
            for frame, pcm in iter_audio(audio):
                if frame is not None:
                    writer.write_audio(frame)
                engine.push_audio(pcm)
                pushed += len(pcm)
                while engine.block_ready():
                    engine.generate_block()
                    drain(None)
            if pushed == 0:
                raise MediaError(f"{audio}: audio is empty (zero samples)")
            total = max(1, round(pushed * fps / SAMPLE_RATE))
            engine.finish_audio()
            while written < total and engine.block_ready():
                engine.generate_block()
                drain(total)
            writer.close()
    finally:
        bar.close()
        engine.close()
    return RenderResult(out, written, pushed / SAMPLE_RATE, engine.width, engine.height)
