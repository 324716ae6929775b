"""Reading one 2D image file (PNG, JPEG, TIFF ...) into the pixels dataset.py's folders and caches train on: grey or
RGB, 16-bit and float images scaled to 0-255 each by its own values (from data layout version 5 on clipped to its
--intensity-percentiles, as a volume is), transparency laid on black, and what Pillow would misread refused by name.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from runtime.errors import BadInputError
from volumes.layouts import Layout
from volumes.reader import Slicing, dangling, printable


def load_image(path: str, mode: str, percentiles: tuple[float, float] | None = None) -> Image.Image:
    """Open an image and convert it to `mode` ("L" or "RGB"); a file PIL cannot decode is named.

    16-bit and float images (MRI exports often use 12 of the 16 bits), which PIL would clip to white, are scaled to
    0-255 each by its own values, as each volume is: with `percentiles` (layout version 5: --intensity-percentiles)
    clipped to them (`_to_uint8`: one hot pixel does not darken the slice; signed or z-scored values keep their lower
    half), else (versions 1-4) from 0 to its maximum, values below 0 clipped. A float image's NaN and infinite pixels
    are black (as a volume's); transparent pixels (RGBA, LA, palette with transparency) are laid on black, the
    background of a slice. A 16-bit PNG or TIFF in colour or with transparency, which PIL reads as its pixels' top 8
    bits, is refused.
    """
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1 and img.format == "TIFF":  # a stack: only its first slice would be read
                raise BadInputError(f"{printable(path)} holds {img.n_frames} images (a TIFF stack): save one slice "
                                    "per file, or the volume as NIfTI")
            if img.mode in ("RGB", "RGBA") and _bits_per_sample(img, path) == 16:
                raise BadInputError(f"{printable(path)} is a 16-bit {img.format} in colour or with transparency, which "
                                    "Pillow reads as its pixels' top 8 bits (a 12-bit scan nearly black): save it as "
                                    "16-bit greyscale without transparency, or as 8 bits")
            if img.mode.startswith("I") or img.mode == "F":
                img = Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float64), percentiles))
            elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInputError(f"cannot read image {printable(path)}: {e}{dangling(path)}") from None


def _to_uint8(a: np.ndarray, percentiles: tuple[float, float] | None) -> np.ndarray:
    """load_image's scaling of a 16-bit or float image to 0-255 (non-finite pixels black). With `percentiles`: from
    the lower one of its finite pixels to the upper one of those brighter than its darkest, since a slice's
    background (its darkest) may be nearly all of it: the top slices of an export would come out black, or their
    tissue white. A constant image is black."""
    finite = np.isfinite(a)
    if percentiles is None:
        a = np.where(finite, a, 0).clip(0, None)
        low, high = 0.0, a.max()
    else:
        values = a[finite]
        brighter = values[values > values.min()] if values.size else values
        low = np.percentile(values, percentiles[0]) if values.size else 0.0
        high = np.percentile(brighter, percentiles[1]) if brighter.size else low
        a = np.where(finite, a, low)
    if not high > low:
        return np.zeros(a.shape, dtype=np.uint8)
    return ((a - low) * (255.0 / (high - low))).clip(0, 255).round().astype(np.uint8)


def image_percentiles(slicing: Slicing, layout: Layout) -> tuple[float, float] | None:
    """The percentiles a run's 16-bit and float images are clipped to (`load_image`): its --intensity-percentiles
    from layout version 5 on; None before (from 0 to the maximum)."""
    return tuple(slicing.percentiles) if layout.version >= 5 else None


def _bits_per_sample(img: Image.Image, path) -> int:
    """The bits per sample of a PNG (its header's IHDR) or TIFF (its tag 258) file; 8 for other formats."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            return f.read(25)[24]
    if img.format == "TIFF":
        return max(img.tag_v2.get(258, (8,)))
    return 8
