"""Annotation files (COCO JSON, labelme JSON) turned into index masks, once, in a cache.

The format readers (`dli.data.coco`, `dli.data.labelme`) parse and check their files
and return an `AnnotationSet`: the class names and, per image, its declared size and the
ordered list of its `Shape` s (each one defect region of one class). This module turns such
a set into the index-mask layout that every other part of dli reads:

    <cache>/annotations/<name>-<key>/
        classes.txt        the class names, one a line (index value k = k-th name, 1-based)
        masks/<rel>.png    an 8-bit index PNG per annotated image: 0 = background, k = class k
                           (none for a defect-free image: its mask is all zeros)
        images.csv         image,mask,values: each image (absolute path), its mask and the
                           values its mask holds (``1 3``); written last

`<cache>` is ``$DLI_CACHE`` or ``~/.cache/dli``; `<key>` is a SHA-256 of the annotation files'
bytes and of every image's relative path and pixel size (`AnnotationSet.key`), so a second run with
the same annotations reuses the masks without rasterizing anything, and any edit to an
annotation or a resized image gives a new folder. The folder is written beside its final
name and renamed into place (`materialize`), so an interrupted run never leaves a partial one.

Overlapping shapes. An index mask holds one class per pixel, so where shapes overlap one must
win: **the smaller shape is drawn on top** (shapes are painted in order of decreasing pixel
area; of two shapes of equal area, the later one in the file is on top). A small defect lying
inside a large one (a pit inside a stained area) therefore keeps its pixels, whatever order
the labelling tool wrote them in. Pixels of one class overlapping pixels of the same class
simply merge.

A shape that rasterizes to no pixel is an error ("empty segmentation"), as is any fault the
readers find; all of them are collected and raised as one `DliError` naming every file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import READ_ERRORS
from dli.data.manifest import CLASSES_FILE, Manifest, Problem, labelled_sample, problems_error

RASTERIZER_VERSION = 1
"""Part of every cache key: bumped whenever the rasterization of a format changes."""

PAIRS_FILE = "images.csv"
"""The cache folder's list of (original image, index mask) pairs, written last."""

MASKS_FOLDER = "masks"
MAX_CLASSES = 255
"""Index masks are 8-bit PNGs: at most 255 defect classes."""

OUTSIDE_TOLERANCE = 1.0
"""A polygon vertex may lie up to this many pixels outside the image (tools round and overshoot)."""


class Shape(Protocol):
    """One annotated region: a class and a way to draw its pixels."""

    class_id: int
    """0-based index into `AnnotationSet.class_names`."""

    where: str
    """Where the shape is written, for messages (e.g. ``annotation id 7 in train.json``)."""

    def mask(self, height: int, width: int) -> np.ndarray:
        """The (height, width) bool pixels of the shape."""
        ...


@dataclass(frozen=True)
class AnnotatedImage:
    """One image and its shapes; no shape means defect-free.

    Attributes:
        image: absolute path of the image file.
        height, width: its pixel size (checked against the file by the reader).
        shapes: its regions in file order (the order only breaks ties of the overlap rule).
        origin: the file that annotates the image (its COCO file or labelme JSON; for a
            defect-free labelme image the folder or list that says so), named in messages.
    """

    image: Path
    height: int
    width: int
    shapes: tuple[Shape, ...]
    origin: Path

    @property
    def defect_free(self) -> bool:
        return not self.shapes


@dataclass(frozen=True)
class AnnotationSet:
    """What a format reader found: class names and annotated images, keyed for the cache.

    Attributes:
        source: the annotation file or folder given as ``--data``.
        fmt: the format's name (``coco``, ``labelme``), part of the cache folder's name.
        class_names: defect class names; index value k in a mask is ``class_names[k - 1]``.
        images: every image of the dataset, in a stable order.
        key_files: the annotation files whose bytes, with the images' sizes, key the cache.
        root: the folder image paths are shown relative to.
    """

    source: Path
    fmt: str
    class_names: tuple[str, ...]
    images: tuple[AnnotatedImage, ...]
    key_files: tuple[Path, ...]
    root: Path

    def relative(self, path: Path) -> str:
        """`path` relative to `root` (POSIX), or its absolute form when outside it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def key(self) -> str:
        """SHA-256 (hex) of the format, the rasterizer version, the class names, the annotation
        files' bytes and every image's relative path and size: equal keys give equal masks."""
        digest = hashlib.sha256()
        digest.update(f"{self.fmt}\n{RASTERIZER_VERSION}\n".encode())
        digest.update("\n".join(self.class_names).encode() + b"\n\n")
        for path in self.key_files:
            digest.update(f"{self.relative(path)}\n".encode())
            try:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError as error:
                raise DliError(f"cannot read {path}: {error.strerror or error}") from None
        for item in self.images:
            digest.update(f"{self.relative(item.image)}\t{item.height}\t{item.width}\n".encode())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading image headers (the readers check declared sizes against them).


def normal_path(path: Path) -> Path:
    """`path` absolute with ``..`` and ``.`` folded, symbolic links kept (as the other readers)."""
    return Path(os.path.normpath(path.absolute()))


def image_size(path: Path) -> tuple[int, int] | str:
    """(H, W) from the image's header, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        return "missing image"
    except READ_ERRORS as error:
        return f"unreadable image: {error}"


def image_sizes(paths: Sequence[Path], workers: int | None = None) -> list[tuple[int, int] | str]:
    """`image_size` of every path, on a few threads (header reads wait on the disk)."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(image_size, paths))
    return [image_size(p) for p in paths]


def outside_image(xs: np.ndarray, ys: np.ndarray, height: int, width: int) -> bool:
    """Whether a vertex lies more than `OUTSIDE_TOLERANCE` pixels outside [0, width] x [0, height]."""
    tol = OUTSIDE_TOLERANCE
    return bool(
        xs.size and (xs.min() < -tol or ys.min() < -tol or xs.max() > width + tol or ys.max() > height + tol)
    )


# ---------------------------------------------------------------------------------------------
# Index masks.


def index_mask(item: AnnotatedImage) -> tuple[np.ndarray, list[Problem]]:
    """The (H, W) uint8 index mask of `item` by the overlap rule, and its empty shapes as problems."""
    canvas = np.zeros((item.height, item.width), dtype=np.uint8)
    drawn: list[tuple[int, int, np.ndarray, int]] = []  # (-area, order, pixels, class value)
    problems: list[Problem] = []
    for order, shape in enumerate(item.shapes):
        try:
            pixels = shape.mask(item.height, item.width)
        except ValueError as error:  # pycocotools on a malformed compressed RLE
            problems.append(Problem(item.image, "bad segmentation", f"{shape.where}: {error}"))
            continue
        area = int(np.count_nonzero(pixels))
        if area == 0:
            problems.append(Problem(item.image, "empty segmentation", f"{shape.where}: no pixel inside"))
            continue
        drawn.append((-area, order, pixels, shape.class_id + 1))
    drawn.sort(key=lambda entry: (entry[0], entry[1]))  # largest first; equal areas in file order
    for _, _, pixels, value in drawn:
        canvas[pixels] = value
    return canvas, problems


def _mask_name(aset: AnnotationSet, item: AnnotatedImage, taken: set[str]) -> str:
    """A unique ``masks/`` path for `item` that echoes its image's relative path."""
    rel = aset.relative(item.image)
    name = Path(rel.lstrip("/").replace("../", "__/")).with_suffix(".png").as_posix()
    if name in taken:  # a.jpg and a.png in one folder
        name = Path(rel.lstrip("/").replace("../", "__/")).as_posix() + ".png"
    taken.add(name)
    return name


def _encode_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def cache_root() -> Path:
    """``$DLI_CACHE/annotations`` (or ``~/.cache/dli/annotations``)."""
    return Path(os.environ.get("DLI_CACHE") or Path.home() / ".cache" / "dli").absolute() / "annotations"


def cache_folder(aset: AnnotationSet) -> Path:
    """Where `materialize` keeps the masks of `aset` (its name shows the format and source)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in aset.source.stem)[:40] or "data"
    return cache_root() / f"{aset.fmt}-{stem}-{aset.key()[:20]}"


@dataclass(frozen=True)
class IndexMasks:
    """The materialized index masks of an `AnnotationSet`.

    Attributes:
        folder: the cache folder (layout in the module docstring).
        class_names: as in the set.
        pairs: (original image, its index mask or None when defect-free) per image, in the
            set's order.
        classes: the class ids (0-based) each mask holds, ascending; empty for defect-free.
        reused: whether the folder existed already (nothing was rasterized).
    """

    folder: Path
    class_names: tuple[str, ...]
    pairs: tuple[tuple[Path, Path | None], ...]
    classes: tuple[tuple[int, ...], ...]
    reused: bool


def _mask_names(aset: AnnotationSet) -> list[str]:
    taken: set[str] = set()
    return [_mask_name(aset, item, taken) for item in aset.images]


def _write_masks(aset: AnnotationSet, folder: Path, workers: int) -> list[tuple[int, ...]]:
    """Rasterize every annotated image into `folder`; the class ids each mask holds, in image order.

    Defect-free images get no mask file (a sample without a mask reads as all zeros). Raises one
    error listing every empty shape (nothing is kept then).
    """
    names = _mask_names(aset)
    for name in {Path(n).parent for item, n in zip(aset.images, names, strict=True) if item.shapes}:
        (folder / MASKS_FOLDER / name).mkdir(parents=True, exist_ok=True)

    def one(job: tuple[AnnotatedImage, str]) -> tuple[tuple[int, ...], list[Problem]]:
        item, name = job
        if not item.shapes:
            return (), []
        mask, problems = index_mask(item)
        if problems:
            return (), problems
        (folder / MASKS_FOLDER / name).write_bytes(_encode_png(mask))
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:])
        return tuple(int(c) for c in present), []

    jobs = list(zip(aset.images, names, strict=True))
    if workers > 1 and len(jobs) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, jobs))
    else:
        results = [one(job) for job in jobs]
    problems = [p for _, found in results for p in found]
    if problems:
        raise problems_error(problems, aset.source)
    return [classes for classes, _ in results]


def _read_classes(folder: Path) -> list[tuple[int, ...]]:
    """The class ids per image recorded in a complete cache folder's `PAIRS_FILE`."""
    with (folder / PAIRS_FILE).open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [tuple(int(v) - 1 for v in row[2].split()) for row in rows]


def materialize(aset: AnnotationSet, *, workers: int | None = None) -> IndexMasks:
    """The index masks of `aset` in the cache: reused when its key matches, else rasterized.

    Raises one `DliError` listing every shape that rasterizes to no pixel (nothing is cached
    then). Writing goes to a temp folder renamed into place; of two processes racing, the
    first rename wins and the other's identical copy is discarded.
    """
    if len(aset.class_names) > MAX_CLASSES:
        raise DliError(
            f"{aset.source}: {len(aset.class_names)} classes; index masks hold at most {MAX_CLASSES}"
        )
    folder = cache_folder(aset)
    names = _mask_names(aset)
    pairs = tuple(
        (item.image, folder / MASKS_FOLDER / n if item.shapes else None)
        for item, n in zip(aset.images, names, strict=True)
    )
    if (folder / PAIRS_FILE).is_file():  # written last: the folder is complete
        classes = _read_classes(folder)
        if len(classes) == len(pairs):
            return IndexMasks(folder, aset.class_names, pairs, tuple(classes), reused=True)
    workers = workers or min(8, os.cpu_count() or 1)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as error:
        raise DliError(f"cannot write the mask cache {folder.parent}: {error.strerror or error}") from None
    try:
        classes = _write_masks(aset, tmp, workers)
        (tmp / CLASSES_FILE).write_text("".join(f"{n}\n" for n in aset.class_names), encoding="utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("image", "mask", "values"))
        for (image, _), name, found in zip(pairs, names, classes, strict=True):
            mask = f"{MASKS_FOLDER}/{name}" if found else ""
            writer.writerow((image.as_posix(), mask, " ".join(str(c + 1) for c in found)))
        (tmp / PAIRS_FILE).write_text(buffer.getvalue(), encoding="utf-8")
        if folder.exists() and not (folder / PAIRS_FILE).is_file():
            # Not another process's copy (renamed into place complete): a leftover made by hand.
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / PAIRS_FILE).is_file():
                raise
    except OSError as error:
        raise DliError(f"cannot write the mask cache {folder}: {error.strerror or error}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return IndexMasks(folder, aset.class_names, pairs, tuple(classes), reused=False)


# ---------------------------------------------------------------------------------------------
# Which files are annotation sources.


def is_coco_file(path: Path) -> bool:
    """Whether `path` is given as a COCO annotation file (a ``.json`` file)."""
    return path.is_file() and path.suffix.lower() == ".json"


def has_labelme_files(folder: Path) -> bool:
    """Whether `folder` (recursively) holds a ``.json`` file: read as a labelme dataset."""
    return folder.is_dir() and any(True for _ in json_files(folder))


def json_files(folder: Path) -> Iterable[Path]:
    """The ``.json`` files under `folder`, recursively, sorted, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(".json") and not name.startswith("."):
                yield Path(dirpath) / name


def read_annotated(path: Path, class_names: Sequence[str] | None = None) -> Manifest:
    """The `Manifest` of a COCO file or a labelme folder, its shapes rasterized into cached index
    masks (`materialize`); a defect-free image's sample has no mask."""
    aset = read_annotations(path, class_names)
    masks = materialize(aset)
    samples = tuple(
        labelled_sample(image, mask, classes, 8 if mask is not None else 0)
        for (image, mask), classes in zip(masks.pairs, masks.classes, strict=True)
    )
    return Manifest(samples, aset.class_names, aset.root)


def read_annotations(path: Path, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """The `AnnotationSet` of a COCO file or a labelme folder (errors: one `DliError`)."""
    if is_coco_file(path):
        from dli.data.coco import read_coco

        return read_coco(path, class_names=class_names)
    from dli.data.labelme import read_labelme

    return read_labelme(path, class_names=class_names)
