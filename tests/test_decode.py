"""data/decode.py: both JPEG decoders give PIL's pixels, odd files fall back to PIL, bad names are refused."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offloadfr.data.decode import decode_face, resolve_decoder
from offloadfr.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _jpeg(mode: str, shape: tuple[int, ...], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "shape"), [("RGB", (24, 24, 3)), ("L", (24, 24)), ("CMYK", (24, 24, 4)),
                                             ("RGB", (40, 30, 3))])
def test_decoders_give_pils_pixels(mode: str, shape: tuple[int, ...]) -> None:
    """YCbCr and greyscale through simplejpeg, CMYK through the PIL fallback, another size resized: all equal to
    PIL's own decode (the loader's output must not depend on data.decoder)."""
    data = _jpeg(mode, shape)
    with Image.open(io.BytesIO(data)) as im:
        ref = im.convert("RGB").resize((24, 24), Image.Resampling.BILINEAR)
    for decoder in ("simplejpeg", "pil"):
        out = decode_face(data, 24, decoder)
        assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
        assert np.array_equal(out, np.asarray(ref)), decoder


def test_decoders_agree_on_real_faces() -> None:
    """The real 112 px faces of ../shared: the same pixels from both decoders."""
    root = REPO.parent / "shared/data/celeba-subset/train"
    files = sorted(root.rglob("*.jpg"))[:40]
    if not files:
        pytest.skip("../shared/data/celeba-subset is not beside the checkout")
    for path in files:
        data = path.read_bytes()
        assert np.array_equal(decode_face(data, 112, "simplejpeg"), decode_face(data, 112, "pil")), path


def test_bytes_that_are_no_image_raise_for_the_loader_to_count() -> None:
    for decoder in ("simplejpeg", "pil"):
        with pytest.raises(Exception, match="cannot identify image file"):
            decode_face(b"not a jpeg at all", 24, decoder)


def test_resolve_decoder() -> None:
    assert resolve_decoder("auto") == "simplejpeg" and resolve_decoder("pil") == "pil"
    with pytest.raises(ConfigError, match="data.decoder = 'turbo' is not one of auto, simplejpeg, pil"):
        resolve_decoder("turbo")


@pytest.mark.slow
def test_loader_cores_bench_rows(tmp_path: Path) -> None:
    """``bench.py data --cores`` on the synthetic set: one row per sampler and decoder, with CPU per image that a
    real measurement can give and the cores for 4,500 img/s computed from it."""
    from offloadfr.config import SynthCfg
    from offloadfr.data.synth import generate_synthetic

    data = tmp_path / "data"
    generate_synthetic(data, SynthCfg(num_identities=40, num_holdout=6, num_pairs=20, min_images=4, max_images=8,
                                      mean_images=6.0, image_size=32, samples_per_shard=60), progress=False)
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "data", "--cores", "--data-path",
                           str(data), "--image-size", "32", "--batch-size", "16",
                           "--num-batches", "3", "--rounds", "1", "--num-workers", "1",
                           "--samplers", "instance", "identity", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sampler"], r["decoder"]) for r in rows] == [
        ("instance", "simplejpeg"), ("instance", "pil"), ("identity", "simplejpeg"), ("identity", "pil")]
    for r in rows:
        assert 5 < r["cpu_us_per_image"] < 100_000 and r["workers_img_per_s"] > 0
        assert r["cores_for_target"] == pytest.approx(4500 * r["cpu_us_per_image"] / 1e6)
