"""COCO JSON annotations (``--data annotations.json``) read into an `AnnotationSet`.

The file holds ``images`` (``id``, ``file_name``, ``width``, ``height``), ``categories``
(``id``, ``name``) and ``annotations`` (``image_id``, ``category_id``, ``segmentation``). A
segmentation is a list of polygons (``[x1, y1, x2, y2, ...]``, at least three vertices), an
uncompressed RLE (``{"counts": [..], "size": [h, w]}``) or a compressed one (``counts`` a
string). pycocotools rasterizes all three (`pycocotools.mask`: ``frPyObjects``, ``merge``,
``decode``), so the masks are exactly those of COCO's own API (``COCO.annToMask``).

- ``file_name`` is relative to the JSON's folder; when no file is there, the ``images/``
  folder beside the JSON and the one beside its folder (``../images/``) are tried, as labelling
  tools export those layouts.
- Class names are the categories' names (lower-cased), in the order of their ids, unless a
  ``classes.txt`` beside the JSON lists them (then every category must be in it).
- An image listed without any annotation is defect-free.

Every fault is collected and raised as one `DliError` naming each offending file: a missing
or unreadable image, an image whose size differs from its ``width``/``height``, an annotation
of an unknown image or category id, an empty segmentation (none given, or no pixel inside),
a malformed polygon or RLE, a polygon vertex more than `OUTSIDE_TOLERANCE` pixels outside its
image, an RLE of another size than its image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_api

from dli.common.errors import DliError
from dli.data.annotations import (
    OUTSIDE_TOLERANCE,
    AnnotatedImage,
    AnnotationSet,
    image_sizes,
    normal_path,
    outside_image,
)
from dli.data.manifest import (
    CLASSES_FILE,
    Problem,
    checked_class_names,
    problems_error,
    read_class_names,
)

IMAGE_FOLDERS: tuple[str, ...] = (".", "images", "../images")
"""Folders, relative to the JSON's, searched in this order for an image's ``file_name``."""


@dataclass(frozen=True)
class CocoShape:
    """One COCO annotation: its class and its segmentation, drawn by pycocotools."""

    class_id: int
    where: str
    segmentation: list[list[float]] | dict[str, Any]

    def mask(self, height: int, width: int) -> np.ndarray:
        seg = self.segmentation
        if isinstance(seg, list):
            rle = mask_api.merge(mask_api.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_api.frPyObjects(seg, height, width)
        else:
            counts = seg["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_api.decode(rle).astype(bool)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise DliError(f"cannot read COCO file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DliError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DliError(f"{path}: not a COCO file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DliError(f"{path}: '{key}' is not a list")
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _categories(
    path: Path, data: dict[str, Any], class_names: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[int, int]]:
    """The class names and the map category id -> class id."""
    names_by_id: dict[int, str] = {}
    for number, category in enumerate(data.get("categories", [])):
        if not (isinstance(category, dict) and _is_int(category.get("id")) and category.get("name")):
            raise DliError(f"{path}: category {number} needs an integer 'id' and a 'name', got {category!r}")
        if category["id"] in names_by_id:
            raise DliError(f"{path}: category id {category['id']} is listed twice")
        names_by_id[category["id"]] = str(category["name"]).strip().lower()
    found = checked_class_names([names_by_id[i] for i in sorted(names_by_id)], str(path))
    if class_names is not None:
        order, origin = checked_class_names(class_names, "class_names"), "class_names"
    elif (path.parent / CLASSES_FILE).is_file():
        order, origin = read_class_names(path.parent / CLASSES_FILE), str(path.parent / CLASSES_FILE)
    else:
        return found, {i: found.index(n) for i, n in names_by_id.items()}
    missing = [n for n in found if n not in order]
    if missing:
        raise DliError(f"{path}: categories {', '.join(missing)} are not listed in {origin}")
    return order, {i: order.index(n) for i, n in names_by_id.items()}


def _locate(base: Path, file_name: str) -> Path:
    """The first existing of `file_name` under `IMAGE_FOLDERS` of `base`, else its plain path."""
    first = normal_path(base / file_name)
    if first.is_file():
        return first
    others = (normal_path(base / folder / file_name) for folder in IMAGE_FOLDERS[1:])
    return next((c for c in others if c.is_file()), first)


def _polygon_problem(polygon: object, height: int, width: int) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one polygon, or None."""
    try:  # one C pass: strings, nested lists and None fail here
        flat = np.asarray(polygon, dtype=np.float64) if isinstance(polygon, list) else None
    except (TypeError, ValueError):
        flat = None
    if flat is None or flat.ndim != 1 or any(isinstance(v, bool) for v in polygon[:2]):
        return "bad polygon", "a polygon must be a flat list of numbers"
    if flat.size % 2 or flat.size < 6:
        return "bad polygon", f"{flat.size} coordinates; a polygon needs an even count, at least 6"
    xy = flat.reshape(-1, 2)
    if not np.isfinite(xy).all():
        return "bad polygon", "a coordinate is not finite"
    if outside_image(xy[:, 0], xy[:, 1], height, width):
        worst = xy[np.argmax(np.maximum(-xy, xy - (width, height)).max(axis=1))]
        return (
            "polygon outside the image",
            f"vertex ({worst[0]:g}, {worst[1]:g}) beyond the image's {width}x{height} "
            f"by more than {OUTSIDE_TOLERANCE:g} px",
        )
    return None


def _segmentation_problem(seg: object, height: int, width: int) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with a segmentation as written, or None."""
    if seg is None or (isinstance(seg, list | dict) and not seg):
        return "empty segmentation", "no segmentation given"
    if isinstance(seg, list):
        for polygon in seg:
            problem = _polygon_problem(polygon, height, width)
            if problem:
                return problem
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return "bad RLE", f"'size' must be [height, width], got {size!r}"
        if list(size) != [height, width]:
            return "RLE size mismatch", f"RLE size {size[1]}x{size[0]}, image {width}x{height}"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "bad RLE", f"counts must be non-negative integers summing to {height * width}"
            if not any(counts[1::2]):
                return "empty segmentation", "the RLE has no foreground run"
            return None
        if isinstance(counts, str | bytes) and counts:
            return None
        return "bad RLE", "'counts' must be a list of run lengths or a compressed string"
    return "bad segmentation", f"expected polygons or an RLE, got {type(seg).__name__}"


_Entries = dict[int, tuple[Path, int, int]]
"""Image id -> (image path, declared height, declared width)."""


def _image_entries(path: Path, data: dict[str, Any], problems: list[Problem]) -> tuple[_Entries, set[object]]:
    """The usable image entries, and the ids of refused ones (their annotations go unreported)."""
    where_file = path.name
    entries: _Entries = {}
    seen_files: dict[Path, int] = {}
    refused: set[object] = set()
    for number, image in enumerate(data["images"]):
        ok = isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
        ok = ok and _is_int(image.get("width")) and _is_int(image.get("height"))
        if not ok:
            detail = f"image entry {number} in {where_file} needs integer id, width, height and a file_name"
            problems.append(Problem(path, "bad image entry", detail))
            if isinstance(image, dict):
                refused.add(image.get("id"))
            continue
        image_path = _locate(path.parent, image["file_name"])
        if image["id"] in entries:
            problems.append(Problem(path, "image id listed twice", f"id {image['id']} in {where_file}"))
        elif image_path in seen_files:
            detail = f"ids {seen_files[image_path]} and {image['id']} in {where_file}"
            problems.append(Problem(image_path, "image listed twice", detail))
            refused.add(image["id"])
        else:
            seen_files[image_path] = image["id"]
            entries[image["id"]] = (image_path, image["height"], image["width"])
    ids = list(entries)
    for image_id, actual in zip(ids, image_sizes([entries[i][0] for i in ids]), strict=True):
        image_path, height, width = entries[image_id]
        if isinstance(actual, str):
            problems.append(Problem(image_path, actual, f"image id {image_id} in {where_file}"))
        elif actual != (height, width):
            detail = f"{actual[1]}x{actual[0]}, but {where_file} says {width}x{height}"
            problems.append(Problem(image_path, "image size differs", detail))
    return entries, refused


def _shapes(
    path: Path,
    data: dict[str, Any],
    entries: _Entries,
    refused: set[object],
    class_of: dict[int, int],
    problems: list[Problem],
) -> dict[int, list[CocoShape]]:
    """Each image's checked annotations, in file order."""
    shapes: dict[int, list[CocoShape]] = {i: [] for i in entries}
    known_ids = ", ".join(map(str, sorted(class_of)))
    for number, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            problems.append(Problem(path, "bad annotation", f"annotation {number} in {path.name}"))
            continue
        where = f"annotation id {ann.get('id', f'#{number}')} in {path.name}"
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in entries:
            if image_id not in refused:
                detail = f"{where}: image_id {image_id!r}"
                problems.append(Problem(path, "annotation of an unknown image id", detail))
            continue
        image_path, height, width = entries[image_id]
        if category_id not in class_of or not _is_int(category_id):
            detail = f"{where}: category_id {category_id!r}; the categories' ids are {known_ids or 'none'}"
            problems.append(Problem(image_path, "unknown category id", detail))
            continue
        seg = ann.get("segmentation")
        problem = _segmentation_problem(seg, height, width)
        if problem:
            problems.append(Problem(image_path, problem[0], f"{where}: {problem[1]}"))
            continue
        shapes[image_id].append(CocoShape(class_of[category_id], where, seg))
    return shapes


def read_coco(path: str | Path, *, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """Read and check a COCO JSON file (rules in the module docstring); nothing is rasterized yet."""
    path = normal_path(Path(path))
    data = _load(path)
    order, class_of = _categories(path, data, class_names)
    problems: list[Problem] = []
    entries, refused = _image_entries(path, data, problems)
    shapes = _shapes(path, data, entries, refused, class_of, problems)
    if problems:
        raise problems_error(problems, path)
    if not entries:
        raise DliError(f"{path}: no images listed")
    images = tuple(
        AnnotatedImage(image_path, height, width, tuple(shapes[image_id]), path)
        for image_id, (image_path, height, width) in sorted(entries.items(), key=lambda kv: kv[1][0])
    )
    return AnnotationSet(path, "coco", order, images, key_files=(path,), root=path.parent)
