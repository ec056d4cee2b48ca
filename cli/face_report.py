"""``live-avatar face-report``: does the built-in avatar keep its face and follow the voice over a long stream?

Every built-in character is streamed through the real :class:`~live.engine.stream.StreamEngine` for ``seconds`` of
held-out speech (:data:`train.synthetic.HELD_OUT_SPEECH`: voices and texts training never used, each utterance
followed by a pause, and a longer silence after each round). Reported per character:

- per facial feature and per 10 s, its *retention* (:func:`train.face_metrics.retention`: contrast kept in the
  feature's box, 1.0 = as crisp as the reference); the mouth separately in silence (the closed-lip line) and in
  speech;
- per held-out voice, Pearson r between the mouth opening measured on the frames and the speech's energy envelope.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from live.engine.stream import ProfileStack, StreamEngine
from live.settings import Settings
from train import face_metrics
from train import synthetic as syn

PAUSE_S = 1.5
ROUND_SILENCE_S = 4.0
WINDOW_S = 10


def held_out_timeline(seconds: float) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """16 kHz audio of ``seconds``: rounds of the held-out utterances (each after :data:`PAUSE_S`), then
    :data:`ROUND_SILENCE_S` of silence; and each utterance's (voice, first sample, end sample)."""
    voices = [(voice, syn.espeak(text, voice)) for voice, text in syn.HELD_OUT_SPEECH]
    n = int(seconds * syn.SAMPLE_RATE)
    audio, spans, pos = np.zeros(n, np.float32), [], 0
    while pos < n:
        for voice, pcm in voices:
            pos += int(PAUSE_S * syn.SAMPLE_RATE)
            end = min(pos + pcm.size, n)
            if end <= pos:
                break
            audio[pos:end] = 0.8 * pcm[: end - pos] / (np.abs(pcm).max() + 1e-6)
            spans.append((voice, pos, end))
            pos = end
        pos += int(ROUND_SILENCE_S * syn.SAMPLE_RATE)
    return audio, spans


def stream_frames(stack: ProfileStack, ch: syn.Character, audio: np.ndarray, seed: int = 0) -> np.ndarray:
    """The engine's frames for ``audio`` with ``ch``'s reference image, as a session would get them."""
    engine = StreamEngine(stack, seed)
    engine.start(syn.reference_image(ch))
    engine.push_audio(audio)
    engine.finish_audio()
    frames = []
    try:
        while engine.block_ready():
            engine.generate_block()
            while (f := engine.ring.get_nowait()) is not None:
                frames.append(f.numpy())
    finally:
        engine.close()
    return np.stack(frames)[: round(audio.size * syn.FPS / syn.SAMPLE_RATE)]


def character_report(frames: np.ndarray, ch: syn.Character, audio: np.ndarray,
                     spans: list[tuple[str, int, int]]) -> dict:
    """Retention per feature per :data:`WINDOW_S` (mouth split into silence and speech) and r per voice."""
    hop = syn.SAMPLE_RATE // syn.FPS
    n = frames.shape[0]
    speaking = np.zeros(n, bool)
    for _, a, b in spans:
        speaking[a // hop: min(n, b // hop + 8)] = True  # 0.32 s after the last word the mouth has closed
    per = WINDOW_S * syn.FPS
    windows = [slice(a, min(a + per, n)) for a in range(0, n - per + 1, per)]
    out: dict[str, list[float]] = {}
    for name, values in face_metrics.retention(frames, ch, window=1).items():
        if name == "mouth":
            out["mouth (silence)"] = [float(np.median(values[w][~speaking[w]])) if (~speaking[w]).any() else
                                      float("nan") for w in windows]
            out["mouth (speech)"] = [float(np.median(values[w][speaking[w]])) if speaking[w].any() else
                                     float("nan") for w in windows]
        else:
            out[name] = [float(np.median(values[w])) for w in windows]
    level = 10 ** (syn.frame_energy_db(audio, n) / 20)
    opening = syn.mouth_openness(frames, ch)
    r_voice: dict[str, list[float]] = {}
    for voice, a, b in spans:
        f0, f1 = a // hop, min(n, b // hop + 8)
        if f1 - f0 > 10 and opening[f0:f1].std() > 0:
            r_voice.setdefault(voice, []).append(float(np.corrcoef(opening[f0:f1], level[f0:f1])[0, 1]))
        elif f1 - f0 > 10:
            r_voice.setdefault(voice, []).append(0.0)  # the mouth never moved
    return {"retention": out, "r": {v: float(np.mean(rs)) for v, rs in r_voice.items()}}


def face_report(settings: Settings, seconds: float) -> str:
    """The markdown report for every built-in character at the profile's frame size."""
    stack = ProfileStack.from_settings(settings)
    width, height = (int(v) for v in settings.video.size_area.split("*"))
    audio, spans = held_out_timeline(seconds)
    lines = []
    for base in syn.BUILTIN:
        ch = dataclasses.replace(base, size=width) if width == height else base
        rep = character_report(stream_frames(stack, ch, audio), ch, audio, spans)
        cols = len(next(iter(rep["retention"].values())))
        lines += [f"### {ch.name}", "", "| feature | " + " | ".join(f"{k * WINDOW_S}–{(k + 1) * WINDOW_S} s"
                                                                  for k in range(cols)) + " | min |",
                  "| --- |" + " --- |" * (cols + 1)]
        for name, values in rep["retention"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.nanmin(values):.2f} |")
        lines += ["", "lip sync r per held-out voice: " + ", ".join(f"{v} {r:.2f}" for v, r in rep["r"].items())
                  + f" (min {min(rep['r'].values()):.2f})", ""]
    return "\n".join(lines)
