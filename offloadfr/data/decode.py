"""JPEG bytes of a stored face -> an (S, S, 3) uint8 RGB array: the decode step of every sampler's reader.

Two decoders give the same pixels (checked on all 44,914 images of the real-face and synthetic datasets: identical
arrays), at different cost: ``simplejpeg`` (libjpeg-turbo called directly into a numpy array) takes 144 µs of CPU
per 112 × 112 face on the CPU VM, PIL (``Image.open(...).convert("RGB")``, then ``np.asarray``) 415 µs, most of it
PIL's per-image overhead, not the decode (docs/benchmarks/loader_cores_cpu-2core_202612.md). ``data.decoder``:

- ``"auto"`` (default): ``simplejpeg`` when it is installed (a dependency of offloadfr), else PIL;
- ``"simplejpeg"``, ``"pil"``: that one (``simplejpeg`` refused when the loader is built, if it is not installed).

``simplejpeg`` decodes only the colour spaces whose RGB it computes as PIL does (YCbCr and greyscale, which is every
image ``offloadfr convert`` writes); CMYK/YCCK files and bytes it cannot parse go to PIL, which decodes them or raises
the error the loader counts as a corrupt sample. A stored image of another side is resized (bilinear, PIL) to
``image_size``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from offloadfr.errors import ConfigError

__all__ = ["decode_face", "resolve_decoder", "DECODERS"]

DECODERS = ("auto", "simplejpeg", "pil")
"""The values of ``data.decoder`` (config/sections.py)."""

_SAME_AS_PIL = ("YCbCr", "Gray")  # the colour spaces simplejpeg converts to RGB exactly as PIL does

try:
    import simplejpeg
except ImportError:  # an install without it (a platform with no wheel): PIL decodes everything
    simplejpeg = None


def resolve_decoder(decoder: str) -> str:
    """The decoder ``decoder`` names (``"auto"``: ``simplejpeg`` when installed, else ``"pil"``).

    Raises:
        ConfigError: an unknown name, or ``"simplejpeg"`` without the package.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"data.decoder = {decoder!r} is not one of {', '.join(DECODERS)}")
    if decoder == "auto":
        return "simplejpeg" if simplejpeg is not None else "pil"
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ConfigError("data.decoder = 'simplejpeg' but simplejpeg is not installed; pip install simplejpeg, or "
                          "set data.decoder = 'pil'")
    return decoder


def decode_face(jpeg: bytes, image_size: int, decoder: str = "pil") -> np.ndarray:
    """Decodes one stored face to (``image_size``, ``image_size``, 3) uint8 RGB with ``decoder`` (resolved:
    ``"simplejpeg"`` or ``"pil"``).

    Raises:
        Exception: what PIL raises on bytes that are not a decodable image (the loader counts the sample as corrupt).
    """
    rgb = None
    if decoder == "simplejpeg":
        try:
            if simplejpeg.decode_jpeg_header(jpeg)[2] in _SAME_AS_PIL:
                rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
        except ValueError:  # not a JPEG simplejpeg reads: PIL decodes it or names the problem
            rgb = None
    if rgb is None:
        with Image.open(io.BytesIO(jpeg)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if rgb.shape[:2] != (image_size, image_size):
        resized = Image.fromarray(rgb).resize((image_size, image_size), Image.Resampling.BILINEAR)
        rgb = np.asarray(resized, dtype=np.uint8)
    return rgb
