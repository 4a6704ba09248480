"""labelme annotations (``--data FOLDER``: images, a ``.json`` beside each) read into an `AnnotationSet`.

A labelme file holds ``shapes`` (each a ``label``, ``points`` and ``shape_type``),
``imagePath`` (relative to the JSON) and ``imageHeight``/``imageWidth``. Its label is the
class name (lower-cased). The image is ``imagePath``, else a file with the JSON's stem and an
image suffix beside it. Shapes become pixels exactly as labelme's own ``shape_to_mask`` draws
them with PIL's ImageDraw:

======================  ======  ==========================================================
shape_type              points  pixels
======================  ======  ==========================================================
``polygon``             >= 3    ``polygon(points, outline=1, fill=1)`` (also a missing type)
``rectangle``           2       ``rectangle(corners, outline=1, fill=1)`` (corners any order)
``circle``              2       ``ellipse`` of the centre (1st point) and radius (to the 2nd)
``line``                2       ``line(points, width=10)``
``linestrip``           >= 2    ``line(points, width=10)``
``point``               1       ``ellipse`` of radius 5
``oriented_rectangle``  4       ``polygon(points, outline=1, fill=1)``
======================  ======  ==========================================================

Defect-free images: a labelme file without shapes, an image without a JSON inside a folder
named ``free``, ``ok`` or ``good`` (at any depth below the dataset folder), or one listed in
``free.txt`` at the dataset folder (paths relative to it, one a line, ``#`` comments). Any
other image without a JSON is an error, so an unlabelled image is never silently taken as
defect-free. Class order: a ``classes.txt`` in the dataset folder, else the sorted labels.

Every fault is collected and raised as one `DliError` naming each offending file: a JSON
that is not a labelme file, a missing or unreadable image, an ``imageWidth``/``imageHeight``
that differs from the image, an image claimed by two JSONs, a shape with a bad type or point
count, a vertex more than `OUTSIDE_TOLERANCE` pixels outside the image, a shape with no
pixel inside, an annotated image marked defect-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dli.common.errors import DliError
from dli.data.annotations import (
    OUTSIDE_TOLERANCE,
    AnnotatedImage,
    AnnotationSet,
    image_sizes,
    json_files,
    normal_path,
    outside_image,
)
from dli.data.imageio import IMAGE_EXTENSIONS, is_image_file
from dli.data.manifest import (
    CLASSES_FILE,
    FREE_NAMES,
    Problem,
    checked_class_names,
    problems_error,
    read_class_names,
)

FREE_LIST = "free.txt"
"""A list of defect-free images (relative paths) in the dataset folder."""

LINE_WIDTH = 10
POINT_RADIUS = 5
"""labelme's defaults for ``line``/``linestrip`` width and ``point`` radius (``shape_to_mask``)."""

POINT_COUNTS: dict[str, tuple[int, int]] = {
    "polygon": (3, 1 << 30),
    "rectangle": (2, 2),
    "circle": (2, 2),
    "line": (2, 2),
    "linestrip": (2, 1 << 30),
    "point": (1, 1),
    "oriented_rectangle": (4, 4),
}
"""The shape types read, with their (fewest, most) points."""


@dataclass(frozen=True)
class LabelmeShape:
    """One labelme shape, drawn as labelme's ``shape_to_mask`` draws it."""

    class_id: int
    where: str
    shape_type: str
    points: tuple[tuple[float, float], ...]

    def mask(self, height: int, width: int) -> np.ndarray:
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        xy = list(self.points)
        if self.shape_type == "circle":
            (cx, cy), (px, py) = xy
            r = math.hypot(cx - px, cy - py)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
        elif self.shape_type == "rectangle":
            (x0, y0), (x1, y1) = xy
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
        elif self.shape_type in ("line", "linestrip"):
            draw.line(xy, fill=1, width=LINE_WIDTH)
        elif self.shape_type == "point":
            (cx, cy) = xy[0]
            r = POINT_RADIUS
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
        else:
            draw.polygon(xy, outline=1, fill=1)
        return np.asarray(canvas, dtype=bool)


@dataclass
class _Labelled:
    """One parsed labelme file: its image, declared size and raw shapes."""

    json_path: Path
    image: Path
    declared: tuple[int | None, int | None]  # (imageHeight, imageWidth) as written
    shapes: list[dict[str, Any]]


def _image_of(json_path: Path, image_path: object) -> Path:
    """The image a labelme file annotates: its ``imagePath``, else a same-stem image beside it."""
    if isinstance(image_path, str) and image_path:
        candidate = normal_path(json_path.parent / image_path.replace("\\", "/"))
        if candidate.is_file():
            return candidate
    for suffix in IMAGE_EXTENSIONS + tuple(s.upper() for s in IMAGE_EXTENSIONS):
        candidate = json_path.with_suffix(suffix)
        if candidate.is_file():
            return normal_path(candidate)
    if isinstance(image_path, str) and image_path:
        return normal_path(json_path.parent / image_path.replace("\\", "/"))
    return normal_path(json_path.with_suffix(".jpg"))


def _parse(json_path: Path) -> _Labelled | Problem:
    try:
        data = json.loads(json_path.read_bytes())
    except OSError as error:
        return Problem(json_path, "unreadable file", error.strerror or str(error))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return Problem(json_path, "not valid JSON", str(error))
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return Problem(json_path, "not a labelme file", f"a COCO file: train with --data {json_path}")
        return Problem(json_path, "not a labelme file", "no 'shapes' list")
    declared = tuple(
        v if isinstance(v, int) and not isinstance(v, bool) else None
        for v in (data.get("imageHeight"), data.get("imageWidth"))
    )
    return _Labelled(json_path, _image_of(json_path, data.get("imagePath")), declared, data["shapes"])  # type: ignore[arg-type]


def _shape_problem(shape: object, height: int, width: int) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one raw shape, or None."""
    if not isinstance(shape, dict):
        return "bad shape", "a shape must be an object"
    label = shape.get("label")
    if not isinstance(label, str) or not label.strip():
        return "bad shape", "no label"
    shape_type = shape.get("shape_type") or "polygon"
    if shape_type not in POINT_COUNTS:
        return "unsupported shape type", f"{shape_type!r}; read are {', '.join(POINT_COUNTS)}"
    points = shape.get("points")
    ok = isinstance(points, list) and all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in p)
        for p in points
    )
    if not ok:
        return "bad shape", "points must be a list of [x, y] numbers"
    low, high = POINT_COUNTS[shape_type]
    if not low <= len(points) <= high:
        wanted = str(low) if low == high else f"at least {low}"
        return "bad shape", f"a {shape_type} has {len(points)} points, needs {wanted}"
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        return "bad shape", "a coordinate is not finite"
    if outside_image(xy[:, 0], xy[:, 1], height, width):
        return (
            "polygon outside the image",
            f"a vertex lies beyond {width}x{height} by more than {OUTSIDE_TOLERANCE:g} px",
        )
    return None


def _free_list(root: Path) -> tuple[set[Path], list[Problem]]:
    path = root / FREE_LIST
    if not path.is_file():
        return set(), []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DliError(f"cannot read {path}: {error}") from None
    listed: set[Path] = set()
    problems = []
    for number, line in enumerate(lines, start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        image = normal_path(root / name)
        if not image.is_file():
            problems.append(Problem(image, "missing image", f"line {number} of {FREE_LIST}"))
        listed.add(image)
    return listed, problems


def _in_free_folder(root: Path, image: Path) -> bool:
    try:
        parts = image.relative_to(root).parts[:-1]
    except ValueError:
        return False
    return any(part.lower() in FREE_NAMES for part in parts)


def _all_images(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".") and is_image_file(Path(n))
        ]
    return [normal_path(p) for p in found]


def _claim(parsed: list[_Labelled], problems: list[Problem]) -> list[_Labelled]:
    """The parsed files, each image claimed by its first file (a second claim is a problem)."""
    claimed: dict[Path, Path] = {}
    kept: list[_Labelled] = []
    for item in parsed:
        if item.image in claimed:
            detail = f"by {claimed[item.image].name} and {item.json_path.name}"
            problems.append(Problem(item.image, "image annotated twice", detail))
        else:
            claimed[item.image] = item.json_path
            kept.append(item)
    return kept


def _unlabelled(
    root: Path, claimed: set[Path], free_listed: set[Path], problems: list[Problem]
) -> list[Path]:
    """The images no file claims: defect-free when marked so, else each a problem."""
    free: list[Path] = []
    for image in _all_images(root):
        if image in claimed:
            continue
        if image in free_listed or _in_free_folder(root, image):
            free.append(image)
        else:
            where = f"not in a {'/'.join(FREE_NAMES)} folder nor in {FREE_LIST}"
            problems.append(Problem(image, "image without a labelme file", where))
    return free


def _checked(
    item: _Labelled, size: tuple[int, int] | str, marked_free: bool, problems: list[Problem]
) -> bool:
    """Whether one labelme file and its image pass every check (else its problems are added)."""
    if isinstance(size, str):
        problems.append(Problem(item.image, size, f"named by {item.json_path.name}"))
        return False
    height, width = size
    declared = (("imageHeight", item.declared[0], height), ("imageWidth", item.declared[1], width))
    mismatch = [
        f"{key} {value} in {item.json_path.name}, the image has {actual}"
        for key, value, actual in declared
        if value is not None and value != actual
    ]
    if mismatch:
        problems.append(Problem(item.json_path, "image size differs", "; ".join(mismatch)))
        return False
    if item.shapes and marked_free:
        problems.append(Problem(item.json_path, "annotated image marked defect-free", item.image.name))
        return False
    found = [(n, _shape_problem(shape, height, width)) for n, shape in enumerate(item.shapes)]
    for number, problem in found:
        if problem:
            problems.append(Problem(item.json_path, problem[0], f"shape {number}: {problem[1]}"))
    return not any(problem for _, problem in found)


def _annotated(item: _Labelled, height: int, width: int, order: Sequence[str]) -> AnnotatedImage:
    shapes = tuple(
        LabelmeShape(
            order.index(shape["label"].strip().lower()),
            f"shape {number} ({shape['label']}) in {item.json_path.name}",
            shape.get("shape_type") or "polygon",
            tuple((float(x), float(y)) for x, y in shape["points"]),
        )
        for number, shape in enumerate(item.shapes)
    )
    return AnnotatedImage(item.image, height, width, shapes, item.json_path)


def read_labelme(folder: str | Path, *, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """Read and check a folder of labelme files and images (rules in the module docstring)."""
    root = normal_path(Path(folder))
    if not root.is_dir():
        raise DliError(f"dataset not found: {root}")
    problems: list[Problem] = []
    key_files = list(json_files(root))
    parsed = []
    for json_path in key_files:
        result = _parse(json_path)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            parsed.append(result)
    kept = _claim(parsed, problems)
    free_listed, free_problems = _free_list(root)
    problems += free_problems
    free_images = _unlabelled(root, {item.image for item in kept}, free_listed, problems)

    sizes = image_sizes([item.image for item in kept] + free_images)
    checked: list[tuple[_Labelled, int, int]] = []
    for item, size in zip(kept, sizes[: len(kept)], strict=True):
        marked_free = item.image in free_listed or _in_free_folder(root, item.image)
        if _checked(item, size, marked_free, problems):
            checked.append((item, *size))  # type: ignore[misc]
    free_sized: list[tuple[Path, int, int]] = []
    for image, size in zip(free_images, sizes[len(kept) :], strict=True):
        if isinstance(size, str):
            problems.append(Problem(image, size))
        else:
            free_sized.append((image, *size))

    labels = {shape["label"].strip().lower() for item, _, _ in checked for shape in item.shapes}
    order, origin = _class_order(root, labels, class_names)
    for item, _, _ in checked:  # each file that uses a label not listed, by name
        used = [(k, shape["label"].strip().lower()) for k, shape in enumerate(item.shapes)]
        unknown = [(k, label) for k, label in used if label not in order]
        if unknown:
            listed = ", ".join(f"{label!r} (shape {k})" for k, label in unknown)
            problems.append(Problem(item.json_path, "unknown class", f"{listed}: not listed in {origin}"))
    if problems:
        raise problems_error(problems, root)

    images = [_annotated(item, height, width, order) for item, height, width in checked]
    for image, height, width in free_sized:
        origin_path = root / FREE_LIST if image in free_listed else image.parent
        images.append(AnnotatedImage(image, height, width, (), origin_path))
    if not images:
        raise DliError(f"no images in {root}")
    images.sort(key=lambda a: a.image)
    return AnnotationSet(root, "labelme", order, tuple(images), key_files=tuple(key_files), root=root)


def _class_order(
    root: Path, labels: set[str], class_names: Sequence[str] | None
) -> tuple[tuple[str, ...], str]:
    if class_names is not None:
        return checked_class_names(class_names, "class_names"), "class_names"
    if (root / CLASSES_FILE).is_file():
        return read_class_names(root / CLASSES_FILE), str(root / CLASSES_FILE)
    return checked_class_names(sorted(labels), str(root)), str(root)
