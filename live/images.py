"""Reference images: reading/validating user images, the built-in characters, and the upstream size rule."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from live.settings import REPO_ROOT

CHARACTER_DIR = REPO_ROOT / "assets" / "characters"


class ImageError(ValueError):
    """An image could not be used as a reference (unreadable, not an image, too large)."""


def builtin_characters() -> dict[str, Path]:
    """Built-in reference images by name (file stem), in a stable order."""
    return {p.stem: p for p in sorted(CHARACTER_DIR.glob("*.png"))}


def is_builtin_character(path: Path) -> bool:
    """Whether ``path`` is one of the built-in character images."""
    try:
        return Path(path).resolve() in {p.resolve() for p in builtin_characters().values()}
    except OSError:
        return False


def photo_warning(reference_photos: bool) -> str | None:
    """What to tell a user who gives a photo to a profile that cannot animate one (None when it can)."""
    if reference_photos:
        return None
    names = ", ".join(builtin_characters())
    return ("this profile's model animates only its built-in characters (" + names + "); a photo comes out as a "
            "blur. Photos need the 14B profile: --config configs/liveavatar-14b.yaml")


def default_character() -> Image.Image:
    """The first built-in character."""
    chars = builtin_characters()
    if not chars:
        raise ImageError(f"no built-in characters found in {CHARACTER_DIR}")
    return Image.open(next(iter(chars.values()))).convert("RGB")


def load_image(source: str | Path | bytes, max_side: int = 4096, max_bytes: int | None = None) -> Image.Image:
    """Open and validate an image (path or raw bytes) and return it as RGB.

    Raises :class:`ImageError` with a message naming the problem (missing, not an image, too large, corrupt).
    """
    name = "upload" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found")
        data = path.read_bytes()
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"{name}: image is {len(data)} bytes, more than the {max_bytes}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
        if max(img.size) > max_side:
            raise ImageError(f"{name}: image is {img.size[0]}x{img.size[1]}, larger than {max_side} px per side")
        img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image has too many pixels") from exc
    return img.convert("RGB")


def generation_size(image_hw: tuple[int, int], size_area: str, multiple: int = 64) -> tuple[int, int]:
    """Upstream area rule: (H, W) keeping the image's aspect ratio under the area ``"W*H"`` with both sides
    multiples of ``multiple``; among the floor/ceil candidates the largest area that fits wins (ties: closest
    aspect). Reproduces upstream's table: 720*400 → 384×704 for 16:9, 512×512 for square, 704×384 portrait.
    """
    try:
        aw, ah = (int(v) for v in size_area.split("*"))
    except ValueError as exc:
        raise ValueError(f"size_area must look like '720*400', got {size_area!r}") from exc
    max_area = aw * ah
    ih, iw = image_hw
    ratio = ih / iw
    h0, w0 = math.sqrt(max_area * ratio), math.sqrt(max_area / ratio)
    best: tuple[int, float, int, int] | None = None
    for h in {max(multiple, math.floor(h0 / multiple) * multiple), max(multiple, math.ceil(h0 / multiple) * multiple)}:
        for w in {max(multiple, math.floor(w0 / multiple) * multiple), max(multiple, math.ceil(w0 / multiple) * multiple)}:
            if h * w > max_area:
                continue
            key = (h * w, -abs(h / w - ratio), h, w)
            if best is None or key > best:
                best = key
    if best is None:
        return multiple, multiple
    return best[2], best[3]


def image_to_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Scale to cover ``height × width`` and centre-crop; returns ``[1, 3, 1, H, W]`` in [-1, 1].

    Upstream resizes the shorter side and pads with black where the crop is wider than the image; covering
    instead avoids black bars at the cost of cropping a few more pixels.
    """
    scale = max(height / img.height, width / img.width)
    rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    crop = resized.crop((left, top, left + width, top + height))
    arr = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None, :, None]
