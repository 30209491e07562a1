"""A small dataset in the IJB-B / IJB-C layout whose landmarks are known exactly (tests, and docs/ijb.md's measurement).

Each image is an aligned 112 x 112 face (from ``../shared/data/celeba-subset/train``; procedurally drawn faces when
that folder is absent) warped by a random similarity transform ``T`` into a larger "loose crop" canvas. Its five
landmarks are then ``T(template)``, computed here from our own copy of the ArcFace template (independent of
``offloadfr.data.align``), plus a little noise as a detector would add. The warp is this module's own numpy bilinear
sampler (OpenCV pixel-index convention), not the evaluator's Pillow path.

Identities have several templates; a template has several media (ids global, as in IJB, and one media id shared by
two templates of an identity); a media has one or more frames. Every template pair is listed: genuine pairs are
templates of one identity, impostor pairs the rest.

    python -m tests._ijb_fixture OUT --identities 40      # about 540 images, for the docs/ijb.md measurement
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["TEMPLATE_112", "IJBFixture", "build_ijb_fixture", "warp_bilinear", "similarity"]

TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                         [70.7299, 92.2041]])
"""ArcFace's 112 x 112 five-point template (insightface ``arcface_dst``), typed in again for independence."""

CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-subset" / "train"


@dataclass
class IJBFixture:
    """What was written, for the brute-force checks."""

    root: Path
    names: list[str]
    """Image file names, in row order."""
    template: list[int]
    media: list[int]
    landmarks: np.ndarray
    """(N, 5, 2) as written (rounded to 3 decimals)."""
    score: np.ndarray
    """(N,) detector scores as written (rounded to 4 decimals)."""
    identity_of_template: dict[int, int]
    pairs: list[tuple[int, int, int]]
    """(template, template, label) in file order."""


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    """The (2, 3) matrix of ``x -> scale * R(angle) x + t``."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def warp_bilinear(src: np.ndarray, out_to_src: np.ndarray, out_hw: tuple[int, int],
                  background: np.ndarray | float = 0.0) -> np.ndarray:
    """Samples ``src`` (H, W, 3) at ``out_to_src @ (x, y, 1)`` for every output pixel (x, y): bilinear, pixel
    centres at integer coordinates (OpenCV's convention); outside ``src``, ``background``."""
    h, w = out_hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = out_to_src[0, 0] * xs + out_to_src[0, 1] * ys + out_to_src[0, 2]
    sy = out_to_src[1, 0] * xs + out_to_src[1, 1] * ys + out_to_src[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    src_f = src.astype(np.float64)
    sh, sw = src.shape[:2]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((xx >= 0) & (xx < sw) & (yy >= 0) & (yy < sh))[..., None]
        vals = src_f[np.clip(yy, 0, sh - 1), np.clip(xx, 0, sw - 1)]
        return np.where(inside, vals, background)

    out = ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
           + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _drawn_faces(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """A 'face' per call: a skin-coloured ellipse with dark eyes and mouth at the template, random colours."""
    ys, xs = np.mgrid[0:112, 0:112]
    faces = []
    for _ in range(count):
        img = np.full((112, 112, 3), rng.integers(40, 200, 3), dtype=np.float64)
        skin = rng.uniform(120, 230, 3)
        img[((xs - 56) / 40.0) ** 2 + ((ys - 66) / 52.0) ** 2 <= 1] = skin
        for (px, py), r in zip(TEMPLATE_112, (5, 5, 4, 4, 4), strict=True):
            img[(xs - px) ** 2 + (ys - py) ** 2 <= r * r] = skin * rng.uniform(0.2, 0.6)
        faces.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
    return faces


def _identity_faces(rng: np.random.Generator, num_identities: int) -> list[list[np.ndarray]]:
    if CELEBA.is_dir():
        folders = sorted(d for d in CELEBA.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 4)
        chosen = rng.choice(len(folders), size=min(num_identities, len(folders)), replace=False)
        out = []
        for k in sorted(chosen):
            files = sorted(folders[k].glob("*.jpg"))[:6]
            out.append([np.asarray(Image.open(f).convert("RGB").resize((112, 112))) for f in files])
        if len(out) == num_identities:
            return out
    return [_drawn_faces(rng, 4) for _ in range(num_identities)]


def build_ijb_fixture(root: str | Path, *, protocol: str = "IJBC", num_identities: int = 12,
                      templates_per_identity: int = 3, seed: int = 0, landmark_noise: float = 0.3) -> IJBFixture:
    """Writes ``root/meta/<name>_*.txt`` and ``root/loose_crop/*.jpg`` (see the module docstring)."""
    root = Path(root)
    name = protocol.lower()
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    faces = _identity_faces(rng, num_identities)
    template_ids = rng.choice(np.arange(1, 100_000), size=num_identities * templates_per_identity, replace=False)
    names: list[str] = []
    tids: list[int] = []
    mids: list[int] = []
    lmks, scores = [], []
    identity_of: dict[int, int] = {}
    next_media = 500
    for ident in range(num_identities):
        shared_media = None
        for t in range(templates_per_identity):
            tid = int(template_ids[ident * templates_per_identity + t])
            identity_of[tid] = ident
            for m in range(int(rng.integers(2, 4))):  # 2-3 media per template
                if m == 0 and t == 1 and shared_media is not None:
                    mid = shared_media  # one media in two templates (the pooling groups per template)
                else:
                    mid, next_media = next_media, next_media + 1
                shared_media = mid if t == 0 and m == 0 else shared_media
                for _ in range(int(rng.integers(1, 3))):  # 1-2 frames
                    face = faces[ident][int(rng.integers(len(faces[ident])))]
                    side = int(rng.integers(140, 200))
                    scale = rng.uniform(1.0, 1.5)
                    angle = np.deg2rad(rng.uniform(-30, 30))
                    c = side / 2 + rng.uniform(-10, 10, 2)
                    fwd = similarity(scale, angle, 0.0, 0.0)  # aligned -> loose, centre (56, 56) onto c
                    fwd[:, 2] = c - fwd[:, :2] @ np.array([56.0, 56.0])
                    inv = np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))[:2]
                    loose = warp_bilinear(face, inv, (side, side), background=rng.uniform(0, 255, 3))
                    lmk = TEMPLATE_112 @ fwd[:, :2].T + fwd[:, 2] + rng.normal(0, landmark_noise, (5, 2))
                    fname = f"{len(names) + 1}.jpg"
                    buf = io.BytesIO()
                    Image.fromarray(loose).save(buf, format="JPEG", quality=95)
                    (root / "loose_crop" / fname).write_bytes(buf.getvalue())
                    names.append(fname)
                    tids.append(tid)
                    mids.append(mid)
                    lmks.append(np.round(lmk, 3))
                    scores.append(round(float(rng.uniform(0.6, 1.0)), 4))
    all_t = list(identity_of)
    pairs = [(a, b, int(identity_of[a] == identity_of[b])) for i, a in enumerate(all_t) for b in all_t[i + 1:]]
    pairs = [pairs[k] for k in rng.permutation(len(pairs))]
    with open(root / "meta" / f"{name}_name_5pts_score.txt", "w") as f:
        for n, lmk, s in zip(names, lmks, scores, strict=True):
            f.write(" ".join([n, *(f"{v:.3f}" for v in lmk.reshape(-1)), f"{s:.4f}"]) + "\n")
    with open(root / "meta" / f"{name}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, tids, mids, strict=True))
    with open(root / "meta" / f"{name}_template_pair_label.txt", "w") as f:
        f.writelines(f"{a} {b} {lab}\n" for a, b, lab in pairs)
    return IJBFixture(root=root, names=names, template=tids, media=mids, landmarks=np.array(lmks),
                      score=np.array(scores), identity_of_template=identity_of, pairs=pairs)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--templates", type=int, default=3)
    parser.add_argument("--protocol", default="IJBC", choices=["IJBC", "IJBB"])
    args = parser.parse_args()
    fx = build_ijb_fixture(args.out, protocol=args.protocol, num_identities=args.identities,
                           templates_per_identity=args.templates)
    print(f"wrote {len(fx.names)} images, {len(fx.identity_of_template)} templates, {len(fx.pairs)} pairs to "
          f"{args.out}")


if __name__ == "__main__":
    _main()
