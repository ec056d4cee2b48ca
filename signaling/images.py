"""Reference images for sessions: built-in samples and validated uploads (type, bytes, dimensions)."""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections import OrderedDict

from PIL import Image, UnidentifiedImageError

from live.images import ImageError, builtin_characters, load_image
from live.session import SessionOptions

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_UPLOADS = 8
UPLOAD_TTL_S = 3600.0
MAX_PROMPT_CHARS = 1000


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
            fmt = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError("not an image (PNG, JPEG or WebP expected)") from exc
        if fmt not in ALLOWED_FORMATS:
            raise ImageError(f"{fmt} images are not accepted; use PNG, JPEG or WebP")
        return load_image(data, max_side=self.max_side, max_bytes=self.max_bytes)

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
