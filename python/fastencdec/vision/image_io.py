"""Read an image file into an 8-bit RGB ``PIL.Image``, or fail with one clear line.

- EXIF orientation is applied (a phone photo stored sideways comes out upright).
- Modes: 1/L/P/RGB/YCbCr/CMYK convert with pillow; transparency (LA, RGBA, PA, P with
  a transparent colour) is composited onto white, what a viewer shows, rather than
  exposing the arbitrary colour hidden under alpha 0; 16/32-bit integer grayscale
  (I;16*, I) is rescaled from [0, 65535] to [0, 255].
- A file that is missing, empty, not an image, truncated or corrupt, larger than
  pillow's decompression-bomb limit, or in an unsupported mode (float ``F``) raises
  :class:`ImageError`, whose message starts with the file name.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "to_rgb", "DEFAULT_MAX_PIXELS"]

# pillow's default limit (it warns above it and refuses above twice it); we refuse above it.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")


class ImageError(ValueError):
    """An image that cannot be used; ``str()`` is one line naming the file."""


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open ``path`` fully decoded, upright and as 8-bit RGB.

    ``max_pixels``: refuse images with more pixels (None: no limit of ours; pillow's
    own hard limit still applies). ``background``: colour under transparent pixels.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageError(f"{name}: image file not found")
    if not os.path.isfile(name):
        raise ImageError(f"{name}: not a file")
    if os.path.getsize(name) == 0:
        raise ImageError(f"{name}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # our own limit is checked below; pillow still refuses above twice its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(name) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(
                        f"{name}: {width}x{height} = {width * height:,} pixels exceeds the "
                        f"decompression-bomb limit of {max_pixels:,} pixels")
                img.load()  # decode now: truncation and corruption surface here
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, name=name, background=background)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: exceeds pillow's decompression-bomb limit ({err})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image pillow can read (unknown or corrupt "
                         "format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{name}: truncated or corrupt image ({reason})") from None


def to_rgb(img: Image.Image, *, name: str = "image",
           background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``img`` as 8-bit RGB (see the module notes for each mode)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(np.clip(values, 0, 65535) * (255.0 / 65535.0)), 0, 255)
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ImageError(f"{name}: floating-point (mode F) images have no standard value "
                         "range; convert it to 8 or 16 bits first")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        under = np.asarray(background, dtype=np.float32)
        rgb = rgba[..., :3] * alpha + under * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({err})") from None
