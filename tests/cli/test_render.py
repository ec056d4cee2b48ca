"""`live-avatar render`: real files through PyAV, durations, and every bad input."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from cli.render import render
from tests.conftest import make_speechlike


def write_audio(path: Path, pcm: np.ndarray, rate: int, channels: int, codec: str) -> Path:
    """Encode float PCM with PyAV (e.g. mp3 44.1 kHz stereo) so render sees a real compressed file."""
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        data = np.tile(pcm[None], (channels, 1)).astype(np.float32)
        fmt = s.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(data if fmt.endswith("p") else data.T.reshape(1, -1).copy(),
                                           format="fltp" if fmt.endswith("p") else "flt", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for f in resampler.resample(frame):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        return {"fps": v.average_rate, "codec": v.codec_context.name, "frames": frames,
                "audio_codec": a.codec_context.name, "size": (v.width, v.height)}


def test_render_mp3_stereo_any_rate_duration_matches(tiny_settings, tiny_stack, tmp_path):
    seconds = 2.3
    rate = 44100
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    audio = write_audio(tmp_path / "speech.mp3", pcm, rate, 2, "libmp3lame")
    image = tmp_path / "face.jpg"
    Image.new("RGB", (300, 200), (200, 150, 120)).save(image)
    out = tmp_path / "out.mp4"
    result = render(tiny_settings, image, audio, out, seed=3, progress=False, stack=tiny_stack)
    info = probe(out)
    assert info["codec"] == "h264" and info["audio_codec"] == "aac" and info["fps"] == 25
    assert abs(info["frames"] / 25 - result.audio_seconds) <= 1 / 25
    assert abs(result.audio_seconds - seconds) < 0.1  # mp3 adds encoder padding
    assert not list(tmp_path.glob("*.partial"))


def test_render_wav_speech_default_character(tiny_settings, tiny_stack, speech_wav, tmp_path):
    out = tmp_path / "out.mp4"
    result = render(tiny_settings, None, speech_wav, out, progress=False, stack=tiny_stack)
    with av.open(str(speech_wav)) as c:
        duration = c.streams.audio[0].duration * c.streams.audio[0].time_base
    assert abs(result.frames / 25 - float(duration)) <= 1 / 25
    assert probe(out)["frames"] == result.frames


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "render", "--quiet", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def good_audio(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "ok.wav"
    return write_audio(path, make_speechlike(0.6), 16000, 1, "pcm_s16le")


def bad_inputs(tmp: Path, good_audio: Path) -> list[tuple[str, list[str], str]]:
    text_as_image = tmp / "notes.png"
    text_as_image.write_text("this is not an image")
    corrupt = tmp / "corrupt.jpg"
    Image.new("RGB", (64, 64)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    not_audio = tmp / "noise.wav"
    not_audio.write_bytes(b"RIFF\x00\x00garbage" * 10)
    empty = tmp / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    return [
        ("missing image", ["--image", str(tmp / "nope.png"), "--audio", str(good_audio)], "nope.png"),
        ("not an image", ["--image", str(text_as_image), "--audio", str(good_audio)], "notes.png"),
        ("corrupt image", ["--image", str(corrupt), "--audio", str(good_audio)], "corrupt.jpg"),
        ("missing audio", ["--audio", str(tmp / "nope.wav")], "nope.wav"),
        ("unreadable audio", ["--audio", str(not_audio)], "noise.wav"),
        ("zero-length audio", ["--audio", str(empty)], "empty.wav"),
    ]


def test_bad_inputs_exit_nonzero_with_one_clear_line_and_no_output(tmp_path, good_audio, capsys):
    from cli.main import main

    cases = bad_inputs(tmp_path, good_audio)
    for i, (label, args, name) in enumerate(cases):
        out = tmp_path / f"{label.replace(' ', '_')}.mp4"
        if i == 0:  # once through the real console entry point, in a fresh process
            proc = run_cli(*args, "--out", str(out))
            code, err = proc.returncode, proc.stderr
        else:
            code = main(["render", "--quiet", *args, "--out", str(out)])
            err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "float32" not in line]
        assert code != 0, label
        assert "Traceback" not in err, f"{label}: {err}"
        assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], f"{label}: {err}"
        assert not out.exists() and not list(tmp_path.glob("*.partial")), label


def test_a_photo_given_to_the_tiny_profile_renders_with_a_clear_warning(tmp_path, good_audio, capsys):
    from cli.main import main

    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 128), (180, 140, 120)).save(photo)
    assert main(["render", "--quiet", "--image", str(photo), "--audio", str(good_audio),
                 "--out", str(tmp_path / "photo.mp4")]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "built-in characters" in err and "liveavatar-14b" in err
    builtin = sorted((Path(__file__).parents[2] / "assets" / "characters").glob("*.png"))[0]
    assert main(["render", "--quiet", "--image", str(builtin), "--audio", str(good_audio),
                 "--out", str(tmp_path / "builtin.mp4")]) == 0
    assert "warning" not in capsys.readouterr().err
