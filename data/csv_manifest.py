"""CSV manifests: the ``image,mask,class`` format and the reference split files, read and written.

`read_csv` reads either header (formats and class-order rules in `dli.data.manifest`'s
docstring; `read_dataset` calls it for a ``.csv``) and raises one `DliError` listing every bad
row. `write_csv` writes a manifest as ``image,mask,class`` with paths relative to the CSV and
the class order in a ``classes.txt`` beside it, so reading it back gives the same class ids.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.data.manifest import (
    CLASSES_FILE,
    FREE,
    FREE_NAMES,
    MT_CLASSES,
    Manifest,
    Problem,
    Sample,
    checked_class_names,
    class_order,
    problems_error,
    read_class_names,
    unknown_class,
    warn_of_problems,
)

CSV_COLUMNS: tuple[str, str, str] = ("image", "mask", "class")
REFERENCE_COLUMNS: tuple[str, str, str] = ("img_fpath", "mask_fpath", "defect_id")


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / value.strip()))


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DliError(f"cannot read CSV {path}: {error}") from None
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    return header, [row for row in rows if any(row.values())]


def read_csv(path: Path, class_names: Sequence[str] | None) -> Manifest:
    """The manifest of a CSV in either format; `DliError` listing every bad row."""
    header, rows = _read_csv_rows(path)
    if set(CSV_COLUMNS) <= set(header):
        manifest = _read_simple_csv(path, rows, class_names)
    elif set(REFERENCE_COLUMNS) <= set(header):
        manifest = _read_reference_csv(path, rows, class_names)
    else:
        raise DliError(
            f"CSV {path} has columns {header}; expected {','.join(CSV_COLUMNS)} "
            f"or {','.join(REFERENCE_COLUMNS)}"
        )
    if not manifest.samples:
        raise DliError(f"no rows in CSV {path}")
    return manifest


def _row_origin(path: Path, row_number: int) -> str:
    return f"row {row_number} of {path.name}"


@dataclass
class _CsvRows:
    """The samples and problems of one CSV's rows, each row's class and image already read."""

    path: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seen: dict[Path, int] = field(default_factory=dict)

    def admit(self, number: int, image: Path, mask: Path | None, class_id: int) -> None:
        """Keep row `number`'s sample, or its problem: a defect needs a mask, an image is listed once."""
        if mask is None and class_id != FREE:
            where = _row_origin(self.path, number)
            self.problems.append(Problem(image, "defect sample without a mask", where))
        elif image in self.seen:
            rows = f"rows {self.seen[image]} and {number} of {self.path.name}"
            self.problems.append(Problem(image, "listed twice", rows))
        else:
            self.seen[image] = number
            self.samples.append(Sample(image, mask, class_id))


def _read_simple_csv(path: Path, rows: list[dict[str, str]], class_names: Sequence[str] | None) -> Manifest:
    base = path.parent
    found = {r["class"].lower() for r in rows if r["class"] and r["class"].lower() not in FREE_NAMES}
    order, origin = class_order(found, class_names, base / CLASSES_FILE, path)
    collected = _CsvRows(path)
    problems = collected.problems
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        where = _row_origin(path, number)
        if not row["image"]:
            problems.append(Problem(path, "row without an image", where))
            continue
        image = _resolve(base, row["image"])
        name = row["class"].lower()
        if not name:
            problems.append(Problem(image, "row without a class", where))
            continue
        if name in FREE_NAMES:
            class_id = FREE
        elif name in order:
            class_id = order.index(name)
        else:
            problems.append(Problem(image, "unknown class", f"{unknown_class(name, origin)}; {where}"))
            continue
        collected.admit(number, image, _resolve(base, row["mask"]) if row["mask"] else None, class_id)
    if problems:
        raise problems_error(problems, path)
    if origin is None:
        _warn_of_look_alike_classes(path, rows, order)
    return Manifest(tuple(collected.samples), order, base)


LOOK_ALIKE_CUTOFF = 0.8
"""`difflib` similarity from which two class names of a CSV look like one name misspelt."""


def _warn_of_look_alike_classes(path: Path, rows: list[dict[str, str]], order: Sequence[str]) -> None:
    """Without a declared class list every name found is a class, so a typo silently makes a new
    one: warn (one `DatasetWarning`, listing its rows) of each class whose name resembles another
    class with at least as many rows, or a Magnetic Tile class."""

    rows_of: dict[str, list[int]] = defaultdict(list)
    for number, row in enumerate(rows, start=2):
        rows_of[row["class"].lower()].append(number)
    problems = []
    for name in order:
        others = [n for n in order if n != name and len(rows_of[n]) >= len(rows_of[name])]
        others += [n for n in MT_CLASSES if n not in order]
        match = difflib.get_close_matches(name, others, n=1, cutoff=LOOK_ALIKE_CUTOFF)
        if match:
            numbers = rows_of[name]
            listed = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
            problems.append(
                Problem(
                    path,
                    "class name like another",
                    f"class {name!r} in row(s) {listed} looks like {match[0]!r}; it is trained as a class "
                    f"of its own. List the classes in {CLASSES_FILE} beside the CSV to make a misspelt "
                    "class an error",
                )
            )
    if problems:
        warn_of_problems(problems, path)


def _reference_root(path: Path, first_image: str) -> Path:
    for folder in path.parents:
        if (folder / first_image).is_file():
            return folder
    return path.parents[2] if len(path.parents) > 2 else path.parent


def _read_reference_csv(
    path: Path, rows: list[dict[str, str]], class_names: Sequence[str] | None
) -> Manifest:
    root = _reference_root(path, rows[0]["img_fpath"]) if rows else path.parent
    if class_names is not None:
        order = checked_class_names(class_names, "class_names")
    elif (root / CLASSES_FILE).is_file():
        order = read_class_names(root / CLASSES_FILE)
    else:
        order = MT_CLASSES
    collected = _CsvRows(path)
    problems = collected.problems
    for number, row in enumerate(rows, start=2):
        where = _row_origin(path, number)
        if not row["img_fpath"]:
            problems.append(Problem(path, "row without an image", where))
            continue
        image = _resolve(root, row["img_fpath"])
        try:
            class_id = int(row["defect_id"])
        except ValueError:
            problems.append(
                Problem(image, "bad defect_id", f"{row['defect_id']!r} is not an integer; {where}")
            )
            continue
        if not (class_id == FREE or 0 <= class_id < len(order)):
            problems.append(
                Problem(image, "unknown class", f"defect_id {class_id} not in -1..{len(order) - 1}; {where}")
            )
            continue
        mask = _resolve(root, row["mask_fpath"]) if row["mask_fpath"] else None
        collected.admit(number, image, mask, class_id)
    if problems:
        raise problems_error(problems, path)
    return Manifest(tuple(collected.samples), order, root)


def write_csv(manifest: Manifest, path: str | os.PathLike[str]) -> None:
    """Write `manifest` as an ``image,mask,class`` CSV (paths relative to its folder), atomically.

    The class order goes to a ``classes.txt`` beside the CSV, so `read_dataset` gives back the
    same class ids even for classes without samples. An existing ``classes.txt`` there with a
    different order is an error rather than being overwritten.
    """
    path = Path(path).absolute()
    base = path.parent
    indexed = [s.mask for s in manifest.samples if s.index_bits]
    if indexed:
        raise DliError(
            f"cannot write {path}: {len(indexed)} masks (e.g. {indexed[0]}) are index masks, which an "
            "image,mask,class CSV cannot hold; keep them as images/ + masks/ + classes.txt"
        )

    def relative(p: Path) -> str:
        return Path(os.path.relpath(p.absolute(), base)).as_posix()

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in manifest.samples:
        writer.writerow(
            [relative(s.image), relative(s.mask) if s.mask else "", manifest.class_name(s.class_id)]
        )

    classes_file = base / CLASSES_FILE
    names = checked_class_names(manifest.class_names, "the manifest")
    if classes_file.is_file():
        if read_class_names(classes_file) != names:
            raise DliError(
                f"{classes_file} lists other classes than the manifest ({', '.join(names)}); "
                "write the CSV to another folder"
            )
    else:
        atomic_write_text(classes_file, "".join(f"{n}\n" for n in names))
    atomic_write_text(path, buffer.getvalue())
