"""Synthetic talking-face data for the built-in tiny avatar: stylised 2-D characters whose mouth follows speech.

Everything here is exact ground truth: a :class:`Character` is drawn by :func:`render_frame` from a
:class:`FaceState` (mouth openness and roundness, blink, head sway, breathing), and :func:`mouth_track` turns
16 kHz audio into per-frame openness/roundness from its energy envelope and spectral centroid. Negatives (music-like
tones, noise floors, silence) are marked non-speech and keep the mouth closed. Idle motion (blinks, sway,
breathing) runs from a seeded generator regardless of audio, so silence still moves.

The mouth box of a character (:meth:`Character.mouth_box`) contains the mouth for every head offset the renderer
produces; tests measure openness inside it with :func:`mouth_openness` on real output frames.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.audio_features import SAMPLE_RATE
from train.visemes import viseme_track

SIZE = 192  # the shipped model's frame size; a Character drawn at another size scales every length by size / SIZE
FPS = 25
SUPERSAMPLE = 2
MAX_SWAY_X, MAX_SWAY_Y = 3.0, 2.0  # at SIZE
MOUTH_INTERIOR = (70, 18, 32)
FEATURES = ("eyes", "mouth", "nose", "brows", "accessory")  # the facial features :func:`feature_masks` marks


@dataclass(frozen=True)
class Character:
    """Look of one stylised character (colours are RGB tuples; sizes are fractions of the frame)."""

    name: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]
    lips: tuple[int, int, int]
    shirt: tuple[int, int, int]
    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    face_w: float = 0.36
    face_h: float = 0.43
    hair_style: int = 0
    accessory: str = "none"
    pattern: int = 0
    size: int = SIZE

    @property
    def unit(self) -> float:
        """Pixels per pixel of the :data:`SIZE` design (line widths, sway and margins scale with the frame)."""
        return self.size / SIZE

    @property
    def head_center(self) -> tuple[float, float]:
        return self.size * 0.5, self.size * 0.44

    @property
    def mouth_center(self) -> tuple[float, float]:
        cx, cy = self.head_center
        return cx, cy + self.face_h * self.size * 0.24

    @property
    def mouth_width(self) -> float:
        return self.face_w * self.size * 0.5

    @property
    def max_open(self) -> float:
        return self.face_h * self.size * 0.19

    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel box that holds the mouth at any sway/openness."""
        mx, my = self.mouth_center
        u = self.unit
        half_w = self.mouth_width / 2 + (MAX_SWAY_X + 4) * u
        return (int(mx - half_w), int(my - (4 + MAX_SWAY_Y) * u), int(math.ceil(mx + half_w)),
                int(math.ceil(my + self.max_open + (4 + MAX_SWAY_Y) * u)))

    def eye_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel box that holds both eyes and brows (and glasses) at any sway."""
        cx, cy = self.head_center
        fw, fh = self.face_w * self.size, self.face_h * self.size
        u = self.unit
        half_w = fw * 0.2 + fw * 0.11 * 1.7 + (MAX_SWAY_X + 2) * u
        return (int(cx - half_w), int(cy - fh * 0.17 - (MAX_SWAY_Y + 4) * u), int(math.ceil(cx + half_w)),
                int(math.ceil(cy + fh * 0.09 + (MAX_SWAY_Y + 3) * u)))


BUILTIN = (
    Character("ada", skin=(241, 194, 160), hair=(92, 52, 30), eyes=(60, 110, 170), lips=(200, 90, 100),
              shirt=(40, 120, 180), bg_top=(250, 230, 180), bg_bottom=(240, 170, 120), hair_style=1,
              accessory="earrings"),
    Character("bo", skin=(150, 100, 70), hair=(25, 25, 30), eyes=(70, 50, 30), lips=(170, 80, 80),
              shirt=(220, 180, 40), bg_top=(170, 220, 240), bg_bottom=(90, 150, 210), face_w=0.39, face_h=0.41,
              hair_style=0, accessory="glasses", pattern=1),
    Character("cleo", skin=(255, 220, 200), hair=(230, 120, 40), eyes=(60, 150, 90), lips=(220, 110, 130),
              shirt=(150, 60, 150), bg_top=(200, 240, 200), bg_bottom=(120, 190, 140), face_w=0.34, face_h=0.45,
              hair_style=2, accessory="bow"),
    Character("dax", skin=(200, 150, 110), hair=(180, 180, 190), eyes=(40, 40, 120), lips=(180, 90, 90),
              shirt=(60, 60, 70), bg_top=(70, 70, 110), bg_bottom=(30, 30, 50), face_w=0.38, face_h=0.44,
              hair_style=0, accessory="hat", pattern=2),
)


def random_character(rng: np.random.Generator, name: str) -> Character:
    """A random look (for training variety); mouth geometry stays in the same family as the built-ins."""
    def col(lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(lo, hi, 3))

    skin_base = np.array([[255, 224, 196], [241, 194, 160], [200, 150, 110], [150, 100, 70], [100, 65, 45]])
    skin = skin_base[rng.integers(len(skin_base))] + rng.integers(-15, 16, 3)
    return Character(
        name, skin=tuple(int(v) for v in np.clip(skin, 0, 255)), hair=col(), eyes=col(0, 200),
        lips=tuple(int(v) for v in rng.integers([150, 60, 60], [235, 130, 140])), shirt=col(), bg_top=col(),
        bg_bottom=col(), face_w=float(rng.uniform(0.33, 0.40)), face_h=float(rng.uniform(0.40, 0.46)),
        hair_style=int(rng.integers(3)), accessory=str(rng.choice(["none", "glasses", "hat", "earrings", "bow"])),
        pattern=int(rng.integers(3)))


@dataclass(frozen=True)
class FaceState:
    """Pose of one frame: openness/roundness in [0, 1], blink in [0, 1] (1 = shut), offsets in pixels."""

    openness: float = 0.0
    roundness: float = 0.0
    blink: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    breath: float = 0.0


def _background(ch: Character, s: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, s)[:, None, None]
    top, bottom = np.array(ch.bg_top, float), np.array(ch.bg_bottom, float)
    img = np.broadcast_to(top * (1 - t) + bottom * t, (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s]
    if ch.pattern == 1:
        img[((xx + yy) // (s // 12)) % 2 == 0] *= 0.9
    elif ch.pattern == 2:
        img[((xx % (s // 8)) - s // 16) ** 2 + ((yy % (s // 8)) - s // 16) ** 2 < (s // 40) ** 2] *= 1.25
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


_BG_CACHE: dict[Character, Image.Image] = {}


class _Canvas:
    """The supersampled frame being drawn, and (when asked for) one mask per facial feature drawn alongside."""

    def __init__(self, img: Image.Image, masks: bool) -> None:
        self.img = img
        self.d = ImageDraw.Draw(img)
        self.masks = {f: Image.new("L", img.size) for f in FEATURES} if masks else {}
        self._md = {f: ImageDraw.Draw(m) for f, m in self.masks.items()}

    def draw(self, feature: str | None, shape: str, *args, **kw) -> None:
        """``ImageDraw.<shape>(*args, **kw)`` on the frame, and on ``feature``'s mask (in white)."""
        getattr(self.d, shape)(*args, **kw)
        if feature in self._md:
            mk = {k: (255 if k in ("fill", "outline") and v is not None else v) for k, v in kw.items()}
            getattr(self._md[feature], shape)(*args, **mk)


def render_frame(ch: Character, st: FaceState) -> np.ndarray:
    """Draw ``ch`` in pose ``st`` → uint8 ``[ch.size, ch.size, 3]``."""
    return _render(ch, st, masks=False)[0]


def feature_masks(ch: Character, st: FaceState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The frame of :func:`render_frame` and, per facial feature in :data:`FEATURES`, where it is drawn (float32
    coverage in [0, 1] at frame resolution; occluded parts included)."""
    frame, masks = _render(ch, st, masks=True)
    return frame, masks


def _render(ch: Character, st: FaceState, masks: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    u = ch.unit
    k = SUPERSAMPLE * u  # design pixels → supersampled pixels
    s = ch.size * SUPERSAMPLE
    if ch not in _BG_CACHE:
        _BG_CACHE[ch] = _background(ch, s)
    c = _Canvas(_BG_CACHE[ch].copy(), masks)
    cx, cy = ch.head_center
    cx, cy = (cx + st.dx * u) * SUPERSAMPLE, (cy + (st.dy + 0.4 * st.breath) * u) * SUPERSAMPLE
    fw, fh = ch.face_w * s, ch.face_h * s
    sh = st.breath * k
    # body and neck (breathing lifts the shoulders)
    c.draw(None, "ellipse", [s * 0.12, s * 0.80 - sh, s * 0.88, s * 1.35 - sh], fill=ch.shirt)
    c.draw(None, "rectangle", [cx - fw * 0.18, cy + fh * 0.3, cx + fw * 0.18, s * 0.86 - sh], fill=_shade(ch.skin, 0.9))
    if ch.hair_style == 1:  # long hair behind the head
        c.draw(None, "rounded_rectangle", [cx - fw * 0.64, cy - fh * 0.55, cx + fw * 0.64, cy + fh * 0.3],
               radius=fw * 0.3, fill=ch.hair)
    # ears, head
    for side in (-1, 1):
        c.draw(None, "ellipse", [cx + side * fw * 0.5 - fw * 0.09, cy - fh * 0.08, cx + side * fw * 0.5 + fw * 0.09,
                                 cy + fh * 0.14], fill=_shade(ch.skin, 0.95))
        if ch.accessory == "earrings":
            c.draw("accessory", "ellipse", [cx + side * fw * 0.5 - 5 * k, cy + fh * 0.16, cx + side * fw * 0.5 + 5 * k,
                                            cy + fh * 0.16 + 10 * k], fill=(245, 205, 60))
    c.draw(None, "ellipse", [cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2], fill=ch.skin)
    # hair on top
    if ch.hair_style in (0, 1):
        c.draw(None, "chord", [cx - fw * 0.54, cy - fh * 0.6, cx + fw * 0.54, cy + fh * 0.05], 180, 360, fill=ch.hair)
    else:
        c.draw(None, "chord", [cx - fw * 0.52, cy - fh * 0.56, cx + fw * 0.52, cy - fh * 0.02], 180, 360, fill=ch.hair)
        c.draw(None, "ellipse", [cx - fw * 0.2, cy - fh * 0.78, cx + fw * 0.2, cy - fh * 0.38], fill=ch.hair)
    # eyes with blink, brows
    ey = cy - fh * 0.02
    er_w, er_h = fw * 0.11, fh * 0.075 * max(0.0, 1.0 - st.blink)
    for side in (-1, 1):
        ex = cx + side * fw * 0.2
        if er_h > 1.5 * k:
            c.draw("eyes", "ellipse", [ex - er_w, ey - er_h, ex + er_w, ey + er_h], fill=(250, 250, 250))
            ir = min(er_w, er_h) * 0.75
            c.draw("eyes", "ellipse", [ex - ir, ey - ir, ex + ir, ey + ir], fill=ch.eyes)
            c.draw("eyes", "ellipse", [ex - ir * 0.45, ey - ir * 0.45, ex + ir * 0.45, ey + ir * 0.45], fill=(15, 15, 20))
        else:
            c.draw("eyes", "line", [ex - er_w, ey, ex + er_w, ey], fill=_shade(ch.skin, 0.45), width=round(2 * k))
        c.draw("brows", "line", [ex - er_w * 1.1, ey - fh * 0.12, ex + er_w * 1.1, ey - fh * 0.13],
               fill=_shade(ch.hair, 0.8), width=round(3 * k))
        if ch.accessory == "glasses":
            c.draw("accessory", "ellipse", [ex - er_w * 1.6, ey - er_w * 1.3, ex + er_w * 1.6, ey + er_w * 1.3],
                   outline=(20, 20, 20), width=round(2 * k))
    if ch.accessory == "glasses":
        c.draw("accessory", "line", [cx - fw * 0.2 + er_w * 1.6, ey, cx + fw * 0.2 - er_w * 1.6, ey], fill=(20, 20, 20),
               width=round(2 * k))
    # nose
    c.draw("nose", "arc", [cx - fw * 0.06, cy + fh * 0.08, cx + fw * 0.06, cy + fh * 0.2], 20, 160,
           fill=_shade(ch.skin, 0.7), width=round(2 * k))
    # mouth
    mx, my = ch.mouth_center
    mx, my = (mx + st.dx * u) * SUPERSAMPLE, (my + (st.dy + 0.4 * st.breath) * u) * SUPERSAMPLE
    half = ch.mouth_width * SUPERSAMPLE / 2 * (1.0 - 0.4 * st.roundness)
    open_px = st.openness * ch.max_open * SUPERSAMPLE
    if open_px < 1.5 * k:
        c.draw("mouth", "line", [mx - half, my, mx + half, my], fill=ch.lips, width=round(3 * k))
    else:
        lip = 2.5 * k
        c.draw("mouth", "ellipse", [mx - half - lip, my - lip - 1 * k, mx + half + lip, my + open_px + lip], fill=ch.lips)
        c.draw("mouth", "ellipse", [mx - half, my, mx + half, my + open_px], fill=MOUTH_INTERIOR)
        if open_px > 6 * k:
            c.draw("mouth", "chord", [mx - half * 0.8, my, mx + half * 0.8, my + open_px * 0.5], 180, 360,
                   fill=(245, 245, 240))
    # hat / bow last
    if ch.accessory == "hat":
        c.draw("accessory", "rectangle", [cx - fw * 0.45, cy - fh * 0.95, cx + fw * 0.45, cy - fh * 0.42],
               fill=_shade(ch.shirt, 0.6))
        c.draw("accessory", "rectangle", [cx - fw * 0.7, cy - fh * 0.46, cx + fw * 0.7, cy - fh * 0.38],
               fill=_shade(ch.shirt, 0.5))
    elif ch.accessory == "bow":
        bx, by = cx + fw * 0.3, cy - fh * 0.42
        c.draw("accessory", "polygon", [(bx, by), (bx - 14 * k, by - 9 * k), (bx - 14 * k, by + 9 * k)],
               fill=(230, 60, 120))
        c.draw("accessory", "polygon", [(bx, by), (bx + 14 * k, by - 9 * k), (bx + 14 * k, by + 9 * k)],
               fill=(230, 60, 120))
    size = (ch.size, ch.size)
    frame = np.asarray(c.img.resize(size, Image.Resampling.BOX))
    return frame, {f: np.asarray(m.resize(size, Image.Resampling.BOX), np.float32) / 255.0 for f, m in c.masks.items()}


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)


def reference_image(ch: Character) -> Image.Image:
    """The character at rest: mouth closed, eyes open, no sway — its built-in reference image."""
    return Image.fromarray(render_frame(ch, FaceState()))


# ----- audio → mouth ------------------------------------------------------------------------------------
def frame_energy_db(audio: np.ndarray, frames: int) -> np.ndarray:
    """RMS level (dB) of a 40 ms window centred on each video frame."""
    hop = SAMPLE_RATE // FPS
    pad = np.pad(audio.astype(np.float64), (hop, hop))
    out = np.empty(frames)
    for j in range(frames):
        seg = pad[j * hop + hop // 2: j * hop + hop // 2 + 2 * hop]
        out[j] = 10 * np.log10(np.mean(seg * seg) + 1e-10) if seg.size else -100.0
    return out


def mouth_track(audio: np.ndarray, speech: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (openness, roundness) for ``audio`` with per-sample ``speech`` mask (bool).

    Openness maps the level to [0, 1] over a 30 dB range below the loud end of speech, zero where the frame is
    not speech; roundness is high for low spectral centroid (o/u-like) and low for bright sounds (i/e-like).
    """
    hop = SAMPLE_RATE // FPS
    db = frame_energy_db(audio, frames)
    is_speech = np.array([speech[min(j * hop + hop // 2, len(speech) - 1)] if len(speech) else False
                          for j in range(frames)])
    top = np.percentile(db[is_speech], 95) if is_speech.any() else 0.0
    raw = np.clip((db - (top - 30.0)) / 27.0, 0.0, 1.0) * is_speech
    opening = np.zeros(frames)
    level = 0.0
    for j in range(frames):  # fast attack, slower release, as lips do
        level = raw[j] if raw[j] > level else level + 0.5 * (raw[j] - level)
        opening[j] = level
    roundness = np.zeros(frames)
    for j in range(frames):
        seg = audio[j * hop: j * hop + hop * 2]
        if seg.size < 64:
            continue
        spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
        freqs = np.fft.rfftfreq(seg.size, 1 / SAMPLE_RATE)
        centroid = float((spec * freqs).sum() / (spec.sum() + 1e-9))
        roundness[j] = float(np.clip((2500.0 - centroid) / 2000.0, 0.0, 1.0))
    return opening.astype(np.float32), roundness.astype(np.float32)


def idle_motion(frames: int, rng: np.random.Generator, start: int = 0) -> list[tuple[float, float, float, float]]:
    """Per-frame (blink, dx, dy, breath): blinks every 2–5 s, two-sine head sway, 3.5 s breathing."""
    blink = np.zeros(frames + start)
    t = int(rng.integers(10, 60))
    while t < frames + start:
        for i, v in enumerate((0.5, 1.0, 1.0, 0.5)):
            if t + i < blink.size:
                blink[t + i] = v
        t += int(rng.integers(50, 125))
    ph = rng.uniform(0, 2 * np.pi, 4)
    f = rng.uniform([0.15, 0.35, 0.12, 0.3], [0.3, 0.6, 0.25, 0.5])
    out = []
    for j in range(start, start + frames):
        s = j / FPS
        dx = MAX_SWAY_X * (0.65 * math.sin(2 * math.pi * f[0] * s + ph[0])
                           + 0.35 * math.sin(2 * math.pi * f[1] * s + ph[1]))
        dy = MAX_SWAY_Y * (0.6 * math.sin(2 * math.pi * f[2] * s + ph[2])
                           + 0.4 * math.sin(2 * math.pi * f[3] * s + ph[3]))
        breath = 1.5 * math.sin(2 * math.pi * s / 3.5 + ph[0])
        out.append((float(blink[j]), dx, dy, breath))
    return out


def track_mouth(audio: np.ndarray, speech: np.ndarray, frames: int, track: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (openness, roundness) by ``track``: ``"envelope"`` (:func:`mouth_track`, what the shipped
    checkpoint learnt) or ``"visemes"`` (syllable-level, :func:`train.visemes.viseme_track`)."""
    if track not in MOUTH_TRACKS:
        raise ValueError(f"unknown mouth track {track!r}: use one of {', '.join(MOUTH_TRACKS)}")
    return (mouth_track if track == "envelope" else viseme_track)(audio, speech, frames)


MOUTH_TRACKS = ("envelope", "visemes")


def render_clip(ch: Character, audio: np.ndarray, speech: np.ndarray, frames: int,
                rng: np.random.Generator, track: str = "envelope") -> tuple[np.ndarray, np.ndarray]:
    """Frames ``[frames, ch.size, ch.size, 3]`` uint8 for ``audio`` (16 kHz) and their ground-truth openness, the
    mouth following ``track`` (see :func:`track_mouth`)."""
    opening, roundness = track_mouth(audio, speech, frames, track)
    idle = idle_motion(frames, rng)
    video = np.stack([render_frame(ch, FaceState(float(o), float(r), *m)) for o, r, m in zip(opening, roundness, idle)])
    return video, opening


# ----- audio sources -------------------------------------------------------------------------------------
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.", "Hello, and welcome to the live stream!",
    "Today we are going to talk about the weather.", "I think that is a wonderful idea.",
    "Could you please pass me the salt and pepper?", "She sells sea shells by the sea shore.",
    "We will meet again tomorrow morning at nine.", "Music makes the world a little brighter.",
    "Numbers: one, two, three, four, five, six, seven.", "Open the window, the room is too warm.",
    "My favourite colour is blue, what is yours?", "The train leaves the station in ten minutes.",
    "Bonjour, comment allez-vous aujourd'hui?", "Guten Morgen, wie geht es dir heute?",
    "Hola, me llamo Ana y vivo en Madrid.", "Buongiorno, questa è una bella giornata.",
    "Thank you very much for watching, see you soon.", "Please remember to drink enough water every day.",
)
TRAIN_VOICES = ("en", "en-us", "en-gb-scotland", "de", "fr", "es", "it")
VARIANTS = ("m1", "m3", "f1", "f2", "m5", "f4")
# Speech no training stage ever hears: voices of other languages and texts not in SENTENCES (evaluation only).
HELD_OUT_SPEECH = (("pt+m7", "Bom dia, tudo bem?"), ("nl+m2", "Het regent vandaag."),
                   ("sv+f1", "Vi ses i morgon."), ("pl+m3", "Dzień dobry, co słychać?"),
                   ("fi+f3", "Hyvää huomenta, mitä kuuluu?"), ("el+f2", "Kalimera sas."))


def espeak(text: str, voice: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """Synthesise ``text`` with espeak-ng → 16 kHz mono float32 (resampled with sox)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise RuntimeError("espeak-ng and sox are needed to synthesise training speech")
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "a.wav", Path(tmp) / "b.raw"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True)
        subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed", str(wav)],
                       check=True, capture_output=True)
        pcm = np.fromfile(wav, dtype=np.int16).astype(np.float32) / 32768.0
    return pcm


def speech_bank(count: int, seed: int) -> list[np.ndarray]:
    """``count`` training utterances in several voices, languages, speeds and pitches (levels varied)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        voice = f"{TRAIN_VOICES[i % len(TRAIN_VOICES)]}+{VARIANTS[int(rng.integers(len(VARIANTS)))]}"
        text = SENTENCES[int(rng.integers(len(SENTENCES)))]
        pcm = espeak(text, voice, int(rng.integers(130, 200)), int(rng.integers(25, 75)))
        out.append(pcm * float(rng.uniform(0.3, 1.0)) / (np.abs(pcm).max() + 1e-6))
    return out


def load_speech_bank(path: Path) -> list[np.ndarray]:
    """The utterances of a speech bank ``.npz`` (``train-tiny --stage speech`` writes it) as float32 arrays."""
    return [np.asarray(a, np.float32) for a in np.load(path, allow_pickle=True)["speech"]]


def music_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """Tones with harmonics changing note every 0.2–0.5 s (a negative: the mouth stays closed)."""
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        length = min(n - pos, int(rng.uniform(0.2, 0.5) * SAMPLE_RATE))
        f0 = 220.0 * 2 ** (int(rng.integers(-12, 13)) / 12)
        t = np.arange(length) / SAMPLE_RATE
        note = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3))
        out[pos:pos + length] = note * np.minimum(1.0, np.exp(-t * 3)) * np.hanning(length) ** 0.2
        pos += length
    return out * float(rng.uniform(0.05, 0.4))


def compose_audio(bank: list[np.ndarray], seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A timeline of speech, silence (digital zero or a faint noise floor) and music-like tones → (audio,
    speech mask)."""
    n = int(seconds * SAMPLE_RATE)
    audio = np.zeros(n, np.float32)
    speech = np.zeros(n, bool)
    pos = int(rng.uniform(0, 0.6) * SAMPLE_RATE)
    while pos < n:
        kind = rng.choice(["speech", "silence", "music"], p=[0.65, 0.25, 0.10])
        if kind == "speech":
            utt = bank[int(rng.integers(len(bank)))]
            start = int(rng.integers(0, max(1, utt.size // 2)))
            seg = utt[start:start + n - pos]
            audio[pos:pos + seg.size] = seg
            speech[pos:pos + seg.size] = True
            pos += seg.size
        elif kind == "music":
            seg = music_like(min(n - pos, int(rng.uniform(0.5, 1.5) * SAMPLE_RATE)), rng)
            audio[pos:pos + seg.size] = seg
            pos += seg.size
        pos += int(rng.uniform(0.1, 1.2) * SAMPLE_RATE)
    if rng.random() < 0.5:
        audio += rng.normal(0, rng.uniform(1e-4, 3e-3), n).astype(np.float32)
    return audio, speech


def mouth_openness(frames: np.ndarray, ch: Character) -> np.ndarray:
    """Measured openness per frame ``[n, H, W, 3]`` uint8: share of the mouth box that has the dark mouth
    interior colour (scaled so a fully open mouth reads about 1)."""
    x0, y0, x1, y1 = ch.mouth_box()
    box = frames[:, y0:y1, x0:x1].astype(np.float32)
    dist = np.linalg.norm(box - np.array(MOUTH_INTERIOR, np.float32), axis=-1)
    dark = (dist < 50).mean(axis=(1, 2))
    full = (math.pi / 4) * ch.mouth_width * ch.max_open / ((x1 - x0) * (y1 - y0))
    return dark / full
