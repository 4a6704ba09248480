"""Synthetic Magnetic-Tile-like datasets: the bundled default data and the `dli synth` command.

Grayscale tiles of varied size with MT's look (mean intensity about 0.43, smooth shading,
vertical machining streaks, fine grain), about 70% defect-free, and five defect classes
whose counts follow MT's imbalance (115/85/57/32/103 of 392) and whose shapes echo MT's:

============  ======================================================  ===============
class         appearance                                              mask area
============  ======================================================  ===============
blowhole      1-3 small dark round pits                               0.1% - 0.7%
break         a chunk missing at an edge: dark (or bright) region     1% - 20%
              touching the border, with a bright fracture rim
crack         a thin dark curved line                                 0.2% - 3%
fray          worn band along an edge: smoothed, darker, coarsely     5% - 40%
              rough
uneven        a large darker (or brighter) patch inside the tile      10% - 50%
============  ======================================================  ===============

Mask areas are enforced (a shape outside its range is redrawn), so tests can rely on them.
Every class is learnable from its pixels at 64 px: a defect's mean intensity differs from the
rest of its tile by at least 10%, and the shapes tell the classes apart (a break is a dark or
bright chunk at an edge, a fray a band along a whole edge, an uneven patch lies inside the tile).
Files use the MT layout (``MT_<Class>/Imgs/synth_NNNN.jpg`` + same-name ``.png`` mask, 0/255)
and read back with `read_dataset`. Output is a pure function of (images, seed, size range,
JPEG quality): every random draw comes from NumPy PCG64 generators seeded per image, and PIL's
JPEG and PNG encoders are deterministic, so the same arguments give byte-identical files.

No library draws industrial defects, so the shapes are written here, kept to a few vectorised
NumPy/SciPy/PIL operations per image (200 images take a few seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dli.common.errors import DliError
from dli.data.manifest import FREE, IMAGES_FOLDER, MT_CLASSES, Manifest, read_dataset

T = TypeVar("T")

GENERATOR_VERSION = 2
"""Bumped whenever the output changes, so cached default datasets are regenerated."""

MT_DEFECT_COUNTS: tuple[int, ...] = (115, 85, 57, 32, 103)
"""Images per defect class in Magnetic Tile (order of `MT_CLASSES`)."""

MT_FREE_SHARE = 952 / 1344
"""Share of defect-free images in Magnetic Tile."""

MASK_AREA_RANGES: dict[str, tuple[float, float]] = {
    "blowhole": (0.001, 0.007),
    "break": (0.01, 0.20),
    "crack": (0.002, 0.03),
    "fray": (0.05, 0.40),
    "uneven": (0.10, 0.50),
}
"""Allowed mask area (fraction of the image) per class; generated masks always fall inside."""

DEFAULT_SIZE_RANGE: tuple[tuple[int, int], tuple[int, int]] = ((222, 403), (103, 632))
"""((min H, max H), (min W, max W)): Magnetic Tile's image sizes."""

BUNDLED_IMAGES = 400
BUNDLED_SIZE_RANGE: tuple[tuple[int, int], tuple[int, int]] = ((111, 201), (51, 316))
"""The bundled default dataset (`default_dataset`, what `dli train` uses without `--data`):
400 images at half Magnetic Tile's sizes. Trained at 64 px, its cracks and pits stay a pixel
or two wide, and its validation part (about 25 defect images) is large enough for a stable IoU."""

JPEG_QUALITY = 92
MIN_IMAGES = 10
MARKER_FILE = "synth.json"
"""Written at the dataset root: the generator's arguments, so a folder is recognisably ours."""

_MAX_ATTEMPTS = 50
_MIN_SIDE = 32


# ---------------------------------------------------------------------------------------------
# Class counts.


def class_counts(images: int) -> dict[int, int]:
    """Images per class id (`FREE` included) for a dataset of `images`, in MT's proportions.

    The defect share is MT's (29%); defect images are apportioned to the classes by the
    largest-remainder method, which never reverses MT's order of class sizes.
    """
    n_defect = round(images * (1.0 - MT_FREE_SHARE))
    total = sum(MT_DEFECT_COUNTS)
    quotas = [n_defect * c / total for c in MT_DEFECT_COUNTS]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n_defect - sum(counts)]:
        counts[i] += 1
    return {FREE: images - n_defect, **dict(enumerate(counts))}


# ---------------------------------------------------------------------------------------------
# Texture and shape primitives.


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A defect-free tile, float32 in [0, 1]: shading + vertical machining streaks + grain."""
    mean = rng.uniform(0.30, 0.56)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)
    # Curved tiles catch the light in a vertical band.
    band = rng.uniform(0.03, 0.10) * np.cos(2 * np.pi * (x - rng.uniform(0.2, 0.8)) * rng.uniform(0.5, 1.2))
    shading = 0.035 * _smooth_noise(rng, h, w, (int(rng.integers(2, 5)), int(rng.integers(4, 9))))
    streak_profile = ndimage.uniform_filter1d(rng.standard_normal(w).astype(np.float32), 2)
    streak_strength = 1.0 + 0.5 * _smooth_noise(rng, h, 1, (4, 1))
    streaks = rng.uniform(0.015, 0.035) * streak_strength * streak_profile[None, :]
    grain = rng.uniform(0.012, 0.025) * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(mean + band[None, :] + shading + streaks + grain, 0.0, 1.0)


def _polygon(h: int, w: int, points: np.ndarray) -> np.ndarray:
    """Bool (h, w) mask of the filled polygon with (x, y) vertices `points`."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(canvas) > 0


def _blob(
    rng: np.random.Generator, center: tuple[float, float], radii: tuple[float, float], roughness: float
) -> np.ndarray:
    """Vertices of an ellipse whose radius wobbles by a few random harmonics (`roughness` ~ 0..0.3)."""
    theta = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    wobble = np.zeros_like(theta)
    for k in range(2, 6):
        wobble += rng.normal(0.0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    scale = np.clip(1.0 + wobble, 0.5, 1.6)
    return np.stack(
        [center[0] + radii[0] * scale * np.cos(theta), center[1] + radii[1] * scale * np.sin(theta)], axis=1
    )


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A float32 alpha in [0, 1] with blurred edges, for blending a defect into the tile."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def _edge_band(rng: np.random.Generator, h: int, w: int, depth: float, jagged: float) -> np.ndarray:
    """Bool mask of a band along a random edge whose depth (fraction) varies smoothly along it."""
    side = rng.choice(4, p=[0.2, 0.6, 0.1, 0.1])  # top, bottom, left, right (MT fray favours bottom)
    along, across = (w, h) if side < 2 else (h, w)
    profile = _smooth_noise(rng, 1, along, (1, int(rng.integers(3, 8))))[0]
    rough = ndimage.uniform_filter1d(rng.standard_normal(along).astype(np.float32), 3)
    d = across * depth * (1.0 + 0.25 * profile) + jagged * across * 0.02 * rough
    inside = np.arange(across, dtype=np.float32)[:, None] < d[None, :]  # (across, along), from the edge
    if side in (1, 3):
        inside = inside[::-1]
    return inside if side < 2 else inside.T


# ---------------------------------------------------------------------------------------------
# Defects: each draws a shape, blends it into `img` (in place) and returns its mask.


def _blowhole(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    pits = int(rng.integers(1, 4))
    area = math.exp(rng.uniform(math.log(0.0009), math.log(0.0035))) * h * w / pits
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(pits):
        r = math.sqrt(area / math.pi)
        aspect = rng.uniform(0.7, 1.4)
        center = (rng.uniform(2 * r, w - 2 * r), rng.uniform(2 * r, h - 2 * r))
        mask |= _polygon(h, w, _blob(rng, center, (r * aspect**0.5, r / aspect**0.5), 0.1))
    alpha = _soft(mask, 0.8)
    rim = np.clip(_soft(mask, 2.0) - alpha, 0.0, 1.0)
    img += rim * rng.uniform(0.05, 0.15) - alpha * img * rng.uniform(0.45, 0.7)
    return mask


def _break(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    side = rng.choice(4, p=[0.45, 0.3, 0.125, 0.125])
    along, across = (w, h) if side < 2 else (h, w)
    area = math.exp(rng.uniform(math.log(0.008), math.log(0.09))) * h * w
    aspect = rng.uniform(0.6, 1.6)  # depth / half-width
    half = min(math.sqrt(2 * area / (math.pi * aspect)), 0.48 * along)
    depth = min(2 * area / (math.pi * half), 0.9 * across)
    c = rng.uniform(0.0, along)  # may sit at a corner
    center, radii = {
        0: ((c, 0.0), (half, depth)),
        1: ((c, h - 1.0), (half, depth)),
        2: ((0.0, c), (depth, half)),
        3: ((w - 1.0, c), (depth, half)),
    }[int(side)]
    mask = _polygon(h, w, _blob(rng, center, radii, 0.25))
    alpha = _soft(mask, 0.7)
    rim = np.clip(_soft(mask, 2.5) - alpha, 0.0, 1.0)
    fill = rng.uniform(0.75, 0.9) if rng.random() < 0.25 else rng.uniform(0.04, 0.14)
    fill_texture = fill + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
    img[:] = img * (1 - alpha) + fill_texture * alpha + rim * rng.uniform(0.1, 0.25)
    return mask


def _crack(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    width = int(rng.integers(2, 5))
    length = math.exp(rng.uniform(math.log(0.003), math.log(0.012))) * h * w / width
    length = min(length, 1.5 * max(h, w))
    steps = 24
    angle = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0.0, 0.25, steps))
    dirs = np.stack([np.cos(angle + turns), np.sin(angle + turns)], axis=1)
    path = np.cumsum(dirs * (length / steps), axis=0)
    path = np.vstack([[0.0, 0.0], path])
    lo, hi = path.min(axis=0), path.max(axis=0)
    span = hi - lo
    offset = np.array([rng.uniform(0, max(1.0, w - span[0])), rng.uniform(0, max(1.0, h - span[1]))])
    points = path - lo + offset
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line(
        [(float(x), float(y)) for x, y in points], fill=255, width=width, joint="curve"
    )
    mask = np.asarray(canvas) > 0
    alpha = _soft(mask, 0.6)
    img -= alpha * img * rng.uniform(0.5, 0.75)
    return mask


def _fray(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    mask = _edge_band(rng, h, w, rng.uniform(0.07, 0.33), jagged=1.0)
    alpha = _soft(mask, 1.2)
    # Worn surface: smoothed, darker, with a coarse roughness that survives down-sampling to 64 px.
    worn = ndimage.gaussian_filter(img, 2.0) * rng.uniform(0.62, 0.78)
    cells = (max(2, h // 12), max(2, w // 12))
    worn += rng.uniform(0.04, 0.07) * _smooth_noise(rng, h, w, cells)
    worn += rng.uniform(0.02, 0.04) * rng.standard_normal((h, w), dtype=np.float32)
    img[:] = img * (1 - alpha) + worn * alpha
    return mask


def _uneven(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    area = rng.uniform(0.14, 0.42)
    aspect = rng.uniform(1.2, 2.5)  # tall, pear-like patches as in MT
    rx = math.sqrt(area * h * w / (math.pi * aspect))
    rx, ry = min(rx, 0.48 * w), min(rx * aspect, 0.6 * h)
    center = (rng.uniform(0.35, 0.65) * w, rng.uniform(0.3, 0.7) * h)
    mask = _polygon(h, w, _blob(rng, center, (rx, ry), 0.12))
    alpha = _soft(mask, 2.5)
    gain = rng.uniform(0.58, 0.72) if rng.random() < 0.7 else rng.uniform(1.3, 1.45)
    img[:] = img * (1 + (gain - 1) * alpha)
    return mask


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]] = {
    "blowhole": _blowhole,
    "break": _break,
    "crack": _crack,
    "fray": _fray,
    "uneven": _uneven,
}


def render(rng: np.random.Generator, class_id: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (H, W), mask bool (H, W)) of `class_id` (an MT id or `FREE`).

    A defect whose mask area falls outside `MASK_AREA_RANGES` is redrawn on a fresh tile.
    """
    h, w = size
    if class_id == FREE:
        return _to_uint8(_tile(rng, h, w)), np.zeros((h, w), dtype=bool)
    name = MT_CLASSES[class_id]
    low, high = MASK_AREA_RANGES[name]
    for _ in range(_MAX_ATTEMPTS):
        img = _tile(rng, h, w)
        mask = _DEFECTS[name](rng, img)
        if low <= mask.mean() <= high:
            return _to_uint8(img), mask
    raise RuntimeError(f"could not draw a {name} defect with area in [{low}, {high}] on a {w}x{h} tile")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Writing datasets.


def class_folder(class_id: int) -> str:
    """MT folder name of a class: ``MT_Blowhole`` ... ``MT_Free``."""
    return "MT_Free" if class_id == FREE else f"MT_{MT_CLASSES[class_id].capitalize()}"


def _check_arguments(images: int, seed: int, size_range: tuple[tuple[int, int], tuple[int, int]]) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < MIN_IMAGES:
        raise DliError(f"images must be an integer >= {MIN_IMAGES}, got {images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DliError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        (h0, h1), (w0, w1) = size_range
        ok = _MIN_SIDE <= h0 <= h1 and _MIN_SIDE <= w0 <= w1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DliError(
            f"size_range must be ((min H, max H), (min W, max W)) with sides >= {_MIN_SIDE}, "
            f"got {size_range!r}"
        )


def _write_dataset(
    folder: Path,
    images: int,
    seed: int,
    size_range: tuple[tuple[int, int], tuple[int, int]],
    jpeg_quality: int,
) -> None:
    """Write every file of the dataset into the existing empty `folder`."""
    counts = class_counts(images)
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in counts.items()])
    labels = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed]))).permutation(labels)
    (h0, h1), (w0, w1) = size_range
    for class_id in counts:
        if counts[class_id]:
            (folder / class_folder(class_id) / IMAGES_FOLDER).mkdir(parents=True)
    for index, class_id in enumerate(labels.tolist()):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
        size = (int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1)))
        image, mask = render(rng, class_id, size)
        stem = folder / class_folder(class_id) / IMAGES_FOLDER / f"synth_{index:04d}"
        Image.fromarray(image, mode="L").save(stem.with_suffix(".jpg"), "JPEG", quality=jpeg_quality)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(
            stem.with_suffix(".png"), "PNG", compress_level=6
        )
    marker = {
        "generator": "dli.data.synth",
        "version": GENERATOR_VERSION,
        "images": images,
        "seed": seed,
        "size_range": [list(size_range[0]), list(size_range[1])],
        "jpeg_quality": jpeg_quality,
        "counts": {MT_CLASSES[c] if c != FREE else "free": n for c, n in counts.items()},
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_ours(folder: Path) -> bool:
    """Whether `folder` holds only what `generate` writes (so replacing it loses nothing else)."""
    ours = {MARKER_FILE} | {class_folder(c) for c in (FREE, *range(len(MT_CLASSES)))}
    entries = {p.name for p in folder.iterdir()}
    return MARKER_FILE in entries and entries <= ours


def _fresh_folder(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))


def write_replacing(out: Path, is_ours: Callable[[Path], bool], write: Callable[[Path], T]) -> T:
    """Run `write` on a temp folder beside `out`, then rename it into place; returns its result.

    `out` must be new, empty, or a folder `is_ours` recognizes (then it is replaced). An earlier
    output stays in place until the new one is complete, so an interrupted run never leaves a
    half-written dataset nor loses the old one.
    """
    if out.exists():
        if not out.is_dir():
            raise DliError(f"output exists and is not a folder: {out}")
        if any(out.iterdir()):
            if not is_ours(out):
                raise DliError(f"output folder {out} is not empty and does not hold a dataset from dli synth")
            # Said aloud: runs trained on the old dataset would now read the new one.
            warnings.warn(f"replacing the earlier dli synth dataset in {out}", UserWarning, stacklevel=3)
    tmp = _fresh_folder(out.parent, out.name)
    try:
        result = write(tmp)
        if out.exists():
            old = out.with_name(f"{tmp.name}.old")
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return result


def generate(
    out_dir: str | os.PathLike[str],
    *,
    images: int = 200,
    seed: int = 0,
    size_range: tuple[tuple[int, int], tuple[int, int]] = DEFAULT_SIZE_RANGE,
    jpeg_quality: int = JPEG_QUALITY,
) -> Manifest:
    """Write a synthetic MT-like dataset of `images` images into `out_dir` and read it back.

    `out_dir` must be new, empty, or a previous output of this function (then it is replaced).
    The dataset is written to a temp folder beside it and renamed into place, so an
    interrupted run never leaves a half-written dataset.
    """
    _check_arguments(images, seed, size_range)
    out = Path(out_dir).absolute()
    write_replacing(out, _is_ours, lambda tmp: _write_dataset(tmp, images, seed, size_range, jpeg_quality))
    return read_dataset(out)


def cache_dir() -> Path:
    """Where generated default datasets are kept: ``$DLI_CACHE`` or ``~/.cache/dli``."""
    return Path(os.environ.get("DLI_CACHE") or Path.home() / ".cache" / "dli").absolute()


def default_dataset(images: int = BUNDLED_IMAGES, seed: int = 0) -> Path:
    """Path of the bundled synthetic dataset (`BUNDLED_SIZE_RANGE`), generated into the cache on first use.

    The folder name carries the generator version, `images` and `seed`, so a new generator
    never serves stale data. Generation goes to a temp folder renamed into place; when two
    processes race, the first rename wins and the other's copy (identical) is discarded.
    """
    _check_arguments(images, seed, BUNDLED_SIZE_RANGE)
    path = cache_dir() / f"synth-v{GENERATOR_VERSION}-n{images}-s{seed}"
    if (path / MARKER_FILE).is_file():
        return path
    tmp = _fresh_folder(path.parent, path.name)
    try:
        _write_dataset(tmp, images, seed, BUNDLED_SIZE_RANGE, JPEG_QUALITY)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / MARKER_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# `dli synth`.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", type=Path, metavar="OUT", help="folder to write (new, empty, or a previous output)"
    )
    parser.add_argument("--images", type=int, default=200, help=f"number of images (>= {MIN_IMAGES})")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives identical files"
    )
    from dli.data.synth_formats import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="mt",
        help="layout: mt (MT_<Class>/Imgs/), index (images/ + masks/ index PNGs + classes.txt), "
        "coco (images/ + annotations.json polygons), labelme (<name>.jpg + <name>.json polygons)",
    )
    parser.add_argument("--rgb", action="store_true", help="colour images (tinted tiles, coloured defects)")
    parser.add_argument(
        "--classes-per-image",
        type=int,
        default=1,
        metavar="K",
        help="up to K defect classes in one image (a third of the defect images hold 2..K); not with mt",
    )
    parser.add_argument("--no-free", action="store_true", help="no defect-free images")


def format_counts(manifest: Manifest) -> str:
    """A per-class table of image counts."""
    counts = manifest.counts_by_name()
    width = max(len(n) for n in [*counts, "total"])
    lines = [f"{'class':<{width}}  images", *(f"{n:<{width}}  {k:>6}" for n, k in counts.items())]
    lines.append(f"{'total':<{width}}  {len(manifest):>6}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dli.data.synth_formats import SynthOptions, data_path, generate_formatted

    options = SynthOptions(args.format, args.rgb, args.classes_per_image, not args.no_free)
    if not options.is_default:
        counts = generate_formatted(
            args.out, images=args.images, seed=args.seed, size_range=DEFAULT_SIZE_RANGE, options=options
        )
        out = Path(args.out).absolute()
        print(f"wrote {args.images} images to {out} (train with --data {data_path(out, options)})")
        width = max(len(n) for n in counts)
        print(f"{'class':<{width}}  images")
        print("\n".join(f"{n:<{width}}  {k:>6}" for n, k in counts.items()))
        return 0
    manifest = generate(args.out, images=args.images, seed=args.seed)
    print(f"wrote {len(manifest)} images to {manifest.root}")
    print(format_counts(manifest))
    return 0
