"""Synthetic datasets in the other shapes dli reads: colour, several classes per image, index
masks, COCO and labelme polygons, no defect-free images (`dli synth --format ...`).

The tiles and defects are `dli.data.synth`'s (five MT-like classes, MT's imbalance); this
module varies what real inspection data varies:

- ``rgb``: the tile is tinted by a surface colour (steel, brass, bronze, green) and each
  defect class by a colour of its own, luminance about unchanged;
- ``classes_per_image`` K > 1: about a third of the defect images hold 2..K classes, drawn one
  over the other (largest class first, so a pit stays visible on a stain);
- ``free`` False: every image holds a defect (classes apportioned in MT's proportions);
- ``fmt``: ``mt`` (``MT_<Class>/Imgs/``, one class per image), ``index`` (``images/`` +
  ``masks/`` index PNGs + ``classes.txt``), ``coco`` (``images/`` + ``annotations.json``) or
  ``labelme`` (``<name>.jpg`` + ``<name>.json``; defect-free images in ``good/``).

For ``coco`` and ``labelme`` every instance (an 8-connected component of one class, holes
filled) is written as the polygon of its outline: for COCO, contourpy's iso-line at 0.5 through
the pixel centres shifted by half a pixel (COCO's pixel i spans [i, i + 1)), or a compressed RLE
for an instance too thin for its polygon to keep a pixel under pycocotools; for labelme, the
iso-line hugging the boundary pixels snapped to their centres, as a person clicking along the
edge would draw it. The written annotations are the labels: read back, they give the generating
index masks again up to overlaps and filled holes (pixel IoU 0.9998 on 60 three-class images).

Output is a pure function of the arguments (NumPy PCG64 streams seeded per image), written to a
temp folder renamed into place. `dli synth` without these options keeps writing
`dli.data.synth.generate`'s files, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dli.common.errors import DliError
from dli.data.manifest import CLASSES_FILE, FREE, IMAGES_FOLDER, MT_CLASSES
from dli.data.synth import (
    _DEFECTS,
    _MAX_ATTEMPTS,
    BUNDLED_SIZE_RANGE,
    JPEG_QUALITY,
    MASK_AREA_RANGES,
    MT_DEFECT_COUNTS,
    _check_arguments,
    _soft,
    _tile,
    _to_uint8,
    class_counts,
    class_folder,
    write_replacing,
)

FORMATS: tuple[str, ...] = ("mt", "index", "coco", "labelme")
MARKER = ".synth.json"
"""The generator's arguments, hidden so that no reader takes it for data."""

DRAW_ORDER: tuple[int, ...] = (4, 3, 1, 2, 0)
"""Classes drawn largest first (uneven, fray, break, crack, blowhole): small defects stay on top."""

LABELME_LEVEL = 0.95
"""The iso-line of labelme outlines: just beside the boundary pixels' centres, onto which they snap."""

SEVERAL_SHARE = 1 / 3
"""Share of defect images holding more than one class when `classes_per_image` > 1."""

SURFACE_TINTS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.98, 1.12),  # steel
    (1.12, 1.02, 0.78),  # brass
    (1.15, 0.95, 0.82),  # bronze
    (0.94, 1.06, 0.96),  # anodized green
)
"""Colour factor of the tile in ``rgb`` datasets (jittered by +-0.02 per channel): never gray."""

CLASS_TINTS: tuple[tuple[float, float, float], ...] = (
    (1.15, 0.95, 0.80),  # blowhole: rusty
    (0.85, 0.95, 1.20),  # break: bluish
    (1.10, 1.05, 0.75),  # crack: yellowish
    (0.90, 1.15, 0.95),  # fray: greenish
    (1.15, 0.90, 1.05),  # uneven: purplish
)
"""Colour factor of each class's pixels in ``rgb`` datasets."""


@dataclass(frozen=True)
class SynthOptions:
    """What `generate_formatted` writes (see the module docstring)."""

    fmt: str = "mt"
    rgb: bool = False
    classes_per_image: int = 1
    free: bool = True

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise DliError(f"unknown synth format {self.fmt!r}; choose from {', '.join(FORMATS)}")
        if not 1 <= self.classes_per_image <= len(MT_CLASSES):
            raise DliError(f"classes per image must be 1..{len(MT_CLASSES)}, got {self.classes_per_image}")
        if self.fmt == "mt" and self.classes_per_image > 1:
            raise DliError("the mt layout holds one class per image: use --format index, coco or labelme")

    @property
    def is_default(self) -> bool:
        return self == SynthOptions()


# ---------------------------------------------------------------------------------------------
# Rendering.


def _draw_defect(rng: np.random.Generator, img: np.ndarray, class_id: int) -> np.ndarray:
    """Draw one defect of `class_id` into `img` (in place), its area within range; its mask."""
    low, high = MASK_AREA_RANGES[MT_CLASSES[class_id]]
    for _ in range(_MAX_ATTEMPTS):
        trial = img.copy()
        mask = _DEFECTS[MT_CLASSES[class_id]](rng, trial)
        if low <= mask.mean() <= high:
            img[:] = trial
            return mask
    h, w = img.shape
    raise RuntimeError(f"could not draw a {MT_CLASSES[class_id]} defect in [{low}, {high}] on a {w}x{h} tile")


def _classes_of(rng: np.random.Generator, first: int, options: SynthOptions) -> list[int]:
    """The classes of one defect image: `first`, plus 1..K-1 others for a share of the images."""
    if first == FREE:
        return []
    classes = [first]
    if options.classes_per_image > 1 and rng.random() < SEVERAL_SHARE:
        extra = int(rng.integers(1, options.classes_per_image))
        others = [c for c in range(len(MT_CLASSES)) if c != first]
        classes += rng.choice(others, size=extra, replace=False).tolist()
    return classes


def render_labelled(
    rng: np.random.Generator, classes: list[int], size: tuple[int, int], rgb: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W) or (H, W, 3), index mask uint8 (H, W): 0 background, k + 1 class k)."""
    h, w = size
    img = _tile(rng, h, w)
    index = np.zeros((h, w), dtype=np.uint8)
    for class_id in sorted(classes, key=DRAW_ORDER.index):
        mask = _draw_defect(rng, img, class_id)
        index[mask] = class_id + 1
    if not rgb:
        return _to_uint8(img), index
    tint = np.asarray(SURFACE_TINTS[int(rng.integers(len(SURFACE_TINTS)))]) + rng.uniform(-0.02, 0.02, 3)
    tint /= tint @ (0.299, 0.587, 0.114)  # keep the luminance
    colour = img[..., None] * tint.astype(np.float32)
    for class_id in sorted(set(classes)):
        alpha = _soft(index == class_id + 1, 1.0)[..., None]
        factor = np.asarray(CLASS_TINTS[class_id], dtype=np.float32)
        factor /= factor @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        colour = colour * (1 + alpha * (factor - 1))
    return _to_uint8(colour), index


# ---------------------------------------------------------------------------------------------
# Polygons of instances.


def instance_outlines(index: np.ndarray, level: float = 0.5) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class id, bool pixels, outline (N, 2) x/y through pixel centres) of each instance.

    An instance is an 8-connected component of one class with its holes filled; its outline is
    the longest iso-line at 0.5 of its pixels (padded, so it always closes).
    """
    import contourpy

    out = []
    for value in np.unique(index[index > 0]):
        components, _ = ndimage.label(index == value, structure=np.ones((3, 3), bool))
        for number, box in enumerate(ndimage.find_objects(components), start=1):
            pixels = ndimage.binary_fill_holes(components[box] == number)
            padded = np.pad(pixels, 1).astype(np.float64)
            lines = contourpy.contour_generator(z=padded, line_type="Separate").lines(level)
            ring = max(lines, key=len)[:-1]  # closed: the last point repeats the first
            ring = ring + np.array([box[1].start - 1, box[0].start - 1], dtype=np.float64)
            full = np.zeros(index.shape, bool)
            full[box] = pixels
            out.append((int(value) - 1, full, ring))
    return out


def coco_segmentation(pixels: np.ndarray, ring: np.ndarray) -> list[list[float]] | dict[str, object]:
    """The polygon of `ring` in COCO's coordinates, or the pixels' RLE when the polygon keeps none."""
    from pycocotools import mask as mask_api

    h, w = pixels.shape
    polygon = np.round(ring + 0.5, 2).reshape(-1).tolist()
    if len(polygon) >= 6 and mask_api.area(mask_api.frPyObjects([polygon], h, w))[0] > 0:
        return [polygon]
    rle = mask_api.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _pixel_centres(ring: np.ndarray) -> list[list[float]]:
    """`ring` snapped to the nearest pixel centres, consecutive repeats dropped (labelme's points)."""
    snapped = np.round(ring)
    keep = np.any(snapped != np.roll(snapped, 1, axis=0), axis=1)
    return snapped[keep].tolist() if keep.sum() >= 3 else snapped[:3].tolist()


# ---------------------------------------------------------------------------------------------
# Writing.


def _save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L").save(path, "JPEG", quality=JPEG_QUALITY)


def _labels(images: int, seed: int, free: bool) -> list[int]:
    """The first class of each image (`FREE` for defect-free), in MT's proportions, shuffled."""
    counts = class_counts(images)
    if not free:  # every image a defect image: MT's class shares, largest remainders rounded up
        quotas = [images * c / sum(MT_DEFECT_COUNTS) for c in MT_DEFECT_COUNTS]
        whole = [math.floor(q) for q in quotas]
        for c in sorted(range(len(quotas)), key=lambda c: (whole[c] - quotas[c], c))[: images - sum(whole)]:
            whole[c] += 1
        counts = {FREE: 0, **dict(enumerate(whole))}
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in counts.items()])
    return (
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1]))).permutation(labels).tolist()
    )


def _write(folder: Path, images: int, seed: int, size_range: tuple, options: SynthOptions) -> dict[str, int]:
    """Write every file into the empty `folder`; image count per class (images may count twice)."""
    (h0, h1), (w0, w1) = size_range
    coco: dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(MT_CLASSES)],
    }
    tally = {name: 0 for name in (*MT_CLASSES, "free")}
    for number, first in enumerate(_labels(images, seed, options.free)):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, number, 1])))
        size = (int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1)))
        classes = _classes_of(rng, first, options)
        image, index = render_labelled(rng, classes, size, options.rgb)
        for c in sorted(set(classes)) or [FREE]:
            tally["free" if c == FREE else MT_CLASSES[c]] += 1
        stem = f"synth_{number:04d}"
        if options.fmt == "mt":
            where = folder / class_folder(first) / IMAGES_FOLDER / stem
            _save_image(image, where.with_suffix(".jpg"))
            Image.fromarray((index > 0).astype(np.uint8) * 255, mode="L").save(where.with_suffix(".png"))
        elif options.fmt == "index":
            _save_image(image, folder / "images" / f"{stem}.jpg")
            (folder / "masks").mkdir(exist_ok=True)
            Image.fromarray(index, mode="L").save(folder / "masks" / f"{stem}.png")
        elif options.fmt == "coco":
            _save_image(image, folder / "images" / f"{stem}.jpg")
            image_id = number + 1
            h, w = size
            coco["images"].append(
                {"id": image_id, "file_name": f"images/{stem}.jpg", "height": h, "width": w}
            )
            for class_id, pixels, ring in instance_outlines(index):
                segmentation = coco_segmentation(pixels, ring)
                ys, xs = np.nonzero(pixels)
                bbox = [
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ]
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": class_id + 1,
                        "segmentation": segmentation,
                        "area": int(pixels.sum()),
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
        else:  # labelme
            sub = folder / "good" if first == FREE else folder
            _save_image(image, sub / f"{stem}.jpg")
            if first != FREE:
                shapes = [
                    {
                        "label": MT_CLASSES[class_id],
                        "points": _pixel_centres(ring),
                        "group_id": None,
                        "description": "",
                        "shape_type": "polygon",
                        "flags": {},
                    }
                    for class_id, _, ring in instance_outlines(index, LABELME_LEVEL)
                ]
                h, w = size
                document = {
                    "version": "5.5.0",
                    "flags": {},
                    "shapes": shapes,
                    "imagePath": f"{stem}.jpg",
                    "imageData": None,
                    "imageHeight": h,
                    "imageWidth": w,
                }
                (sub / f"{stem}.json").write_text(json.dumps(document) + "\n", encoding="utf-8")
    if options.fmt in ("index", "coco"):
        (folder / CLASSES_FILE).write_text("".join(f"{n}\n" for n in MT_CLASSES), encoding="utf-8")
    if options.fmt == "coco":
        (folder / "annotations.json").write_text(json.dumps(coco) + "\n", encoding="utf-8")
    return tally


def data_path(out: Path, options: SynthOptions) -> Path:
    """What to pass as ``--data`` for a dataset written to `out`."""
    return out / "annotations.json" if options.fmt == "coco" else out


def _is_ours(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def generate_formatted(
    out_dir: str | Path,
    *,
    images: int = 200,
    seed: int = 0,
    size_range: tuple[tuple[int, int], tuple[int, int]] = BUNDLED_SIZE_RANGE,
    options: SynthOptions,
) -> dict[str, int]:
    """Write a synthetic dataset of `images` images in `options`' shape into `out_dir`.

    `out_dir` must be new, empty, or a previous output of this function (then it is replaced).
    Returns the image count per class (an image of two classes counts for both, ``free`` last).
    """
    _check_arguments(images, seed, size_range)
    options.check()

    def write(tmp: Path) -> dict[str, int]:
        tally = _write(tmp, images, seed, size_range, options)
        marker = {
            "generator": "dli.data.synth_formats",
            "images": images,
            "seed": seed,
            **asdict(options),
        }
        marker["size_range"] = [list(size_range[0]), list(size_range[1])]
        marker["counts"] = tally
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return tally

    return write_replacing(Path(out_dir).absolute(), _is_ours, write)
