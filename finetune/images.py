"""Image files: which files are images, and decoding one into 8-bit RGB, naming it when it fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from finetune.errors import UserError

# torchvision's ImageFolder extensions, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What Pillow raises for a truncated, corrupt or absurdly large file.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(UserError):
    """An image file that cannot be decoded. Raised with its path.

    In a DataLoader worker, torch re-raises an exception as ``type(error)(text)`` where the text
    wraps the original in a traceback; the constructor takes the original message back out, so the
    user reads the path, not a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as 8-bit RGB (from greyscale, 16-bit, palette, RGBA, CMYK...).

    Raises:
        BadImageError: naming ``path``, when the file is truncated, corrupt or not an image.
    """
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except _UNREADABLE as error:
        raise BadImageError(f"{path}: cannot read this image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Transparent pixels keep their colour (alpha is dropped, not composited)."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: keep the top 8 bits
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the documented route for palette + transparency
    return image.convert("RGB")


def is_image_file(path: Path) -> bool:
    """An image by its extension; hidden files (``.DS_Store``, macOS ``._x.jpg``) are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
