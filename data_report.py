"""`dli data DATA`: what training would see of a dataset, and every problem in it.

Reads DATA by the rules of ``dli train --data`` (any supported format: folder per class, CSV,
index masks, COCO JSON, labelme), validates every image and mask as training does, and prints:
images per class (an image holding two classes counts for both), instances per class (the
8-connected components of each class, the donors of injection) with their pixel areas, the
images holding several classes and their class sets, the defect-free images, the image sizes
and channels (how many look gray, as ``--channels auto`` decides, and the files' PIL modes),
then every problem found, errors and warnings alike. Exit status 0 when there is no problem,
2 when there is any (so a script or CI can gate on it).
"""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dli.common.errors import DliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        type=Path,
        metavar="DATA",
        help="a dataset as `dli train --data` takes it: a folder (MT_<Class>/Imgs/, <Class>/Imgs/, "
        "images/ + masks/ + classes.txt, or labelme images with their .json), a .csv, or a COCO .json",
    )


@dataclass
class ClassFigures:
    """One class's numbers: images holding it, its instances and their pixel areas."""

    images: int = 0
    areas: list[int] = field(default_factory=list)


@dataclass
class DatasetSummary:
    """What `summarize` measured of a validated dataset."""

    source: Path
    images: int
    free: int
    classes: dict[str, ClassFigures]
    class_sets: Counter[str]
    sizes: list[tuple[int, int]]
    modes: Counter[str]
    gray: int
    problems: list[str]


def _mode(path: Path) -> str | None:
    from PIL import Image

    from dli.data.imageio import READ_ERRORS

    try:
        with Image.open(path) as image:
            return image.mode
    except READ_ERRORS:  # reported by validation
        return None


def _image_modes(paths: list[Path]) -> list[str | None]:
    """Each image's PIL mode from its header (threads: header reads wait on the disk)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(_mode, paths))


def summarize(manifest, report) -> DatasetSummary:  # type: ignore[no-untyped-def]
    """The figures of `manifest` as validated in `report` (`dli.data.validation.validate`)."""
    classes = {name: ClassFigures() for name in manifest.class_names}
    sets: Counter[str] = Counter()
    for sample in manifest.samples:
        for c in sample.classes:
            classes[manifest.class_names[c]].images += 1
        if len(sample.classes) > 1:
            sets[manifest.class_set_name(sample)] += 1
    for per_sample in report.instances:
        for instance in per_sample:
            classes[manifest.class_names[instance.class_id]].areas.append(instance.area)
    modes = Counter(m for m in _image_modes([s.image for s in manifest.samples]) if m is not None)
    problems = [f"error: {p.line().strip()}" for p in report.errors]
    problems += [f"warning: {p.line().strip()}" for p in report.warnings]
    return DatasetSummary(
        source=manifest.root,
        images=len(manifest),
        free=sum(1 for s in manifest.samples if not s.classes),
        classes=classes,
        class_sets=sets,
        sizes=[size for size in report.image_sizes if size is not None],
        modes=modes,
        gray=sum(
            1 for size, gray in zip(report.image_sizes, report.image_gray, strict=True) if size and gray
        ),
        problems=problems,
    )


def _range(values: list[int]) -> str:
    if not values:
        return "-"
    array = np.asarray(values)
    return f"{array.min()}..{array.max()} (median {int(np.median(array))})"


def format_summary(summary: DatasetSummary) -> str:
    """The report `dli data` prints."""
    several = sum(summary.class_sets.values())
    defect = summary.images - summary.free
    lines = [
        f"images: {summary.images}: {defect} with defects ({several} with several classes), "
        f"{summary.free} defect-free",
    ]
    if summary.sizes:
        heights, widths = [h for h, _ in summary.sizes], [w for _, w in summary.sizes]
        lines.append(
            f"sizes: height {_range(heights)}, width {_range(widths)}; {len(set(summary.sizes))} distinct"
        )
    shown = ", ".join(f"{mode} {n}" for mode, n in summary.modes.most_common())
    colour = len(summary.sizes) - summary.gray
    trained = "1 (gray)" if colour == 0 else "3 (colour)"
    lines.append(
        f"channels: {summary.gray} look gray, {colour} colour (stored as {shown}); --channels auto: {trained}"
    )
    width = max([len(n) for n in summary.classes] + [5])
    lines += [
        "",
        f"{'class':<{width}}  {'images':>6}  {'instances':>9}  {'area px min':>11}  {'median':>7}  "
        f"{'max':>7}  {'total px':>9}",
    ]
    for name, figures in summary.classes.items():
        areas = np.asarray(figures.areas or [0])
        stats = (
            f"{areas.min():>11}  {int(np.median(areas)):>7}  {areas.max():>7}  {areas.sum():>9}"
            if figures.areas
            else f"{'-':>11}  {'-':>7}  {'-':>7}  {0:>9}"
        )
        lines.append(f"{name:<{width}}  {figures.images:>6}  {len(figures.areas):>9}  {stats}")
    lines.append(f"{'free':<{width}}  {summary.free:>6}")
    if summary.class_sets:
        lines += ["", "images with several classes:"]
        lines += [f"  {name}: {count}" for name, count in summary.class_sets.most_common()]
    empty = [name for name, figures in summary.classes.items() if figures.images == 0]
    if empty:
        lines += ["", f"classes without an image: {', '.join(empty)}"]
    lines.append("")
    if summary.problems:
        lines.append(f"{len(summary.problems)} problem{'s' if len(summary.problems) > 1 else ''}:")
        lines += [f"  {p}" for p in summary.problems]
    else:
        lines.append("no problem found")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dli.data.annotations import cache_root
    from dli.data.manifest import DatasetWarning, read_dataset
    from dli.data.validation import validate

    print(f"dataset: {args.data.absolute()}")
    try:
        manifest = read_dataset(args.data)
    except DliError as error:  # the reader's list of every bad file: nothing to measure
        print(f"problems (the dataset cannot be read):\n{error}")
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # listed below, with the errors
        report = validate(manifest, raise_errors=False)
    cache = cache_root()
    cached = next((s.mask for s in manifest.samples if s.mask and s.mask.is_relative_to(cache)), None)
    if cached is not None:
        print(f"index masks rasterized from the annotations: {cache / cached.relative_to(cache).parts[0]}")
    summary = summarize(manifest, report)
    print(format_summary(summary))
    return 2 if summary.problems else 0
