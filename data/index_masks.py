"""Index-mask datasets: ``images/`` + ``masks/`` (one index PNG per image, same stem) + ``classes.txt``.

An index mask holds, at each pixel, 0 for background or k for the k-th class listed in
``classes.txt`` (1-based; class id k - 1 in the `Manifest`). One image may hold several classes;
one whose mask is all zeros is defect-free. Masks are single-channel PNGs of 8 or 16 bits (a
16-bit mask keeps its values: the data path decodes masks at 16 bits). Example::

    steel/
      classes.txt        # scratch \\n pit \\n stain   -> values 1, 2, 3
      images/a.jpg       masks/a.png   (values 0, 1, 3: a scratch and a stain)
      images/b.jpg       masks/b.png   (all 0: defect-free)

`read_index_folder` opens every mask once to learn the classes it holds (a split stratifies by
them), so a value ``classes.txt`` does not list is an error naming the file here, before
anything trains. Everything else (sizes, instances, pixel counts) is `dli.data.validation`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import READ_ERRORS, is_image_file, read_index
from dli.data.manifest import (
    CLASSES_FILE,
    Manifest,
    Problem,
    Sample,
    checked_class_names,
    labelled_sample,
    problems_error,
    read_class_names,
)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
"""Sub-folders of an index-mask dataset."""

MAX_INDEX_CLASSES = 255
"""The most classes an index mask may number (the data path carries class indices as bytes)."""


class IndexMaskError(ValueError):
    """A mask that cannot be read as an index mask; the message says why."""


def is_index_folder(path: Path) -> bool:
    """Whether `path` has the index-mask layout (``images/`` and ``masks/`` sub-folders)."""
    return (path / IMAGES_DIR).is_dir() and (path / MASKS_DIR).is_dir()


def index_values(mask: Image.Image) -> tuple[np.ndarray, int]:
    """(distinct values ascending, bit depth 8 or 16) of an opened index mask.

    Raises `IndexMaskError` for a mask the data path would not read as indices: colour,
    palette (it decodes to the palette's colours) or 1-bit.
    """
    mode = mask.mode
    if mode == "L":
        counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
        return np.flatnonzero(counts), 8
    if mode.startswith("I;16") or mode == "I":
        values = np.unique(np.asarray(mask))
        if values.size and (values[0] < 0 or values[-1] > 65535):
            raise IndexMaskError(f"values {values[0]}..{values[-1]} outside 16 bits")
        return values.astype(np.int64), 16
    if mode == "P":
        raise IndexMaskError(
            "a palette PNG (it decodes to colours): save the class indices as 8-bit grayscale"
        )
    raise IndexMaskError(f"mode {mode}: an index mask is one channel of 8 or 16 bits")


def _mask_classes(mask: Path, num_classes: int) -> tuple[tuple[int, ...], int, Problem | None]:
    """(class ids, bit depth, problem or None) of one index mask."""
    try:
        with Image.open(mask) as opened:
            values, bits = index_values(opened)
    except FileNotFoundError:
        return (), 0, Problem(mask, "missing mask")
    except IndexMaskError as error:
        return (), 0, Problem(mask, "not an index mask", str(error))
    except READ_ERRORS as error:
        return (), 0, Problem(mask, "unreadable mask", str(error))
    values = values[values > 0]
    unknown = values[values > num_classes]
    if unknown.size:
        shown = ", ".join(str(int(v)) for v in unknown[:10]) + (", ..." if unknown.size > 10 else "")
        return (
            (),
            bits,
            Problem(
                mask, "mask value not in the class list", f"values {shown}; {num_classes} classes listed"
            ),
        )
    return tuple(int(v) - 1 for v in values), bits, None


def read_index_folder(
    root: Path, class_names: Sequence[str] | None = None, workers: int | None = None
) -> Manifest:
    """The `Manifest` of an index-mask dataset at `root` (layout in the module docstring).

    Every image needs its mask ``masks/<stem>.png``; the class order comes from `class_names`
    or ``<root>/classes.txt`` (required). Raises one `DliError` listing every missing or
    unreadable mask, every mask without an image and every value the class list lacks.
    """
    root = Path(root).absolute()
    if class_names is not None:
        order = checked_class_names(class_names, "class_names")
        origin = "class_names"
    elif (root / CLASSES_FILE).is_file():
        order, origin = read_class_names(root / CLASSES_FILE), str(root / CLASSES_FILE)
    else:
        raise DliError(
            f"index-mask dataset {root} has no {CLASSES_FILE}: list the class of mask value 1, 2, ... "
            "one name per line"
        )
    if not order:
        raise DliError(f"{origin} lists no class")
    if len(order) > MAX_INDEX_CLASSES:
        raise DliError(
            f"{origin} lists {len(order)} classes; an index mask holds at most {MAX_INDEX_CLASSES}"
        )

    images_dir, masks_dir = root / IMAGES_DIR, root / MASKS_DIR
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(images_dir.iterdir()):
        if is_image_file(p) and not p.name.startswith("."):
            by_stem[p.stem].append(p)
    problems: list[Problem] = []
    pairs: list[tuple[Path, Path]] = []
    for stem, images in by_stem.items():
        if len(images) > 1:
            detail = f"{len(images)} images share the stem {stem!r}"
            problems += [Problem(p, "ambiguous image", detail) for p in images]
        else:
            pairs.append((images[0], masks_dir / f"{stem}.png"))
    for mask in sorted(masks_dir.glob("*.png")):
        if mask.stem not in by_stem and not mask.name.startswith("."):
            problems.append(Problem(mask, "mask without an image", f"no {IMAGES_DIR}/{mask.stem}.*"))
    if not pairs and not problems:
        raise DliError(f"no images in {images_dir}")

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PNG decoding releases the GIL
        measured = list(pool.map(lambda pair: _mask_classes(pair[1], len(order)), pairs))
    samples: list[Sample] = []
    for (image, mask), (classes, bits, problem) in zip(pairs, measured, strict=True):
        if problem is not None:
            problems.append(problem)
        else:
            samples.append(labelled_sample(image, mask, classes, bits))
    if problems:
        raise problems_error(problems, root)
    return Manifest(tuple(samples), order, root)


def mask_class_pixels(sample: Sample, num_classes: int) -> np.ndarray:
    """(C,) int64 pixels of each class in `sample`'s mask at its stored resolution (zeros for a
    defect-free sample): an index mask's values counted, a binary mask's defect pixels given to
    its class."""
    counts = np.zeros(num_classes, dtype=np.int64)
    if sample.is_free or sample.mask is None:
        return counts
    if not sample.index_bits:
        from dli.data.imageio import read_mask

        counts[sample.class_id] = int(read_mask(sample.mask).sum())
        return counts
    values = read_index(sample.mask).ravel()
    found = np.bincount(values[values > 0].astype(np.int64), minlength=num_classes + 1)
    if found.size > num_classes + 1:
        raise DliError(f"mask {sample.mask} holds values above the {num_classes} listed classes")
    counts[:] = found[1:]
    return counts
