"""Reference images for sessions: built-in samples and validated uploads (type, bytes, dimensions)."""

from __future__ import annotations

import asyncio
import io
import secrets
import time
import warnings
from collections import OrderedDict

from PIL import Image

from live.images import ImageError, builtin_characters, load_image
from live.session import SessionOptions

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_UPLOADS = 8
UPLOAD_TTL_S = 3600.0
MAX_PROMPT_CHARS = 1000
BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# An image past PIL's pixel limit is refused, not decoded with a warning on stderr.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageStore:
    """Uploaded images (the validated file bytes), at most ``MAX_UPLOADS`` kept, each for ``UPLOAD_TTL_S``."""

    def __init__(self, max_bytes: int, max_side: int) -> None:
        """Accept uploads of at most ``max_bytes`` bytes and ``max_side`` pixels per side."""
        self.max_bytes = max_bytes
        self.max_side = max_side
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def validate(self, data: bytes) -> Image.Image:
        """Check type, size and dimensions and decode the image; raises :class:`ImageError` (blocking)."""
        if len(data) > self.max_bytes:
            raise ImageError(f"image is {len(data)} bytes, more than the {self.max_bytes}-byte limit")
        try:
            header = Image.open(io.BytesIO(data))
        except BOMBS:
            raise ImageError(f"the image has too many pixels to decode safely; scale it to at most {self.max_side} "
                             "px per side") from None
        except Exception as exc:  # noqa: BLE001 - PIL's format plugins raise many kinds on hostile headers
            raise ImageError("not an image (PNG, JPEG or WebP expected)") from exc
        if header.format not in ALLOWED_FORMATS:
            raise ImageError(f"{header.format} images are not accepted; use PNG, JPEG or WebP")
        width, height = header.size
        if max(width, height) > self.max_side:
            raise ImageError(f"the image is {width}x{height}, larger than {self.max_side} px per side; scale it down")
        try:
            return load_image(data, max_side=self.max_side, max_bytes=self.max_bytes)
        except ImageError as exc:
            raise ImageError(str(exc).removeprefix("upload: ")) from None
        except Exception as exc:  # noqa: BLE001 - a corrupt image body can fail in any of PIL's decoders
            raise ImageError(f"the image data is corrupt ({exc.__class__.__name__}: {exc}); re-export it as PNG or "
                             "JPEG") from None

    def add(self, data: bytes) -> str:
        """Keep validated bytes; returns their id."""
        self._expire()
        while len(self._items) >= MAX_UPLOADS:
            self._items.popitem(last=False)
        image_id = secrets.token_urlsafe(12)
        self._items[image_id] = (time.monotonic(), data)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        """The bytes of an upload, if still kept."""
        self._expire()
        item = self._items.get(image_id)
        return None if item is None else item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and now - next(iter(self._items.values()))[0] > UPLOAD_TTL_S:
            self._items.popitem(last=False)


async def resolve_options(store: ImageStore, image: str | None, prompt: str | None) -> SessionOptions:
    """Session options from a client's choice: a sample name, an upload id, or nothing (the built-in character).

    Raises ``ValueError`` with a message for the client when the choice is unknown or unusable.
    """
    prompt = prompt or ""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    if not image or image == "default":
        return SessionOptions(None, "default", prompt)
    samples = builtin_characters()
    if image in samples:
        return SessionOptions(await asyncio.to_thread(load_image, samples[image]), image, prompt)
    data = store.get(image)
    if data is None:
        raise ValueError(f"unknown image {image!r}: pick a sample from /api/samples or upload one to /api/images")
    return SessionOptions(await asyncio.to_thread(store.validate, data), "upload", prompt)
