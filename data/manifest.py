"""Datasets as manifests: a list of (image, mask, classes) with the class names recorded.

Readers for the Magnetic Tile layout and any folder-per-class dataset live here, CSV manifests in
`dli.data.csv_manifest`;
checking the files' contents is `dli.data.validation`. Everything downstream (splits,
planner, DALI) sees only a `Manifest`.

Dataset formats read by `read_dataset`:

Index masks (`dli.data.index_masks`)
    ``<root>/images/`` + ``<root>/masks/`` (one index PNG per image, same stem) + ``classes.txt``:
    mask value k is the k-th listed class, 0 background; one image may hold several classes.

COCO JSON (`dli.data.coco`) and labelme JSON (`dli.data.labelme`)
    ``--data annotations.json`` (COCO: polygons or RLE, images relative to the file) or a folder
    of images with a labelme ``.json`` beside each (and no ``<Class>/Imgs/`` folder). Their shapes
    are rasterized once into index masks in a cache (`dli.data.annotations`) and read as
    index-mask samples; defect-free images carry no mask.

Folder per class (the Magnetic Tile layout)
    ``<root>/<Folder>/Imgs/`` holds the images of one class. The class name is the folder
    name, lower-cased, without its prefix: ``MT_`` is always dropped, and any other ``<P>_``
    prefix is dropped when every class folder shares it (``KS_Scratch`` and ``KS_Free`` give
    ``scratch`` and ``free``). The folder named ``free``, ``ok`` or ``good`` (after that rule,
    any case) holds the defect-free images; at most one may. Inside ``Imgs/``:

    - an image that is not a PNG (``.jpg .jpeg .bmp .tif .tiff``) has its mask beside it
      under the same stem with ``.png`` (``a.jpg`` + ``a.png``, as in Magnetic Tile);
    - an image that is itself a PNG has its mask at ``<stem>_mask.png``;
    - hence a ``.png`` is a mask, never an image, when another image has its stem or when
      its stem ends with ``_mask``. No file can be read as both.

    Defect-free images need no mask (read as all zeros); a defect image's mask must exist.

CSV with header ``image,mask,class``
    Paths relative to the CSV's folder (or absolute); ``class`` is a class name or ``free``;
    ``mask`` may be empty for defect-free rows only. `dli.data.csv_manifest.write_csv` writes this format.

CSV with header ``img_fpath,mask_fpath,defect_id`` (the reference split files)
    ``defect_id`` is -1 for defect-free, else an index into the class names (Magnetic Tile
    order unless told otherwise). The published files sit at
    ``<root>/splits/reference-seed42/*.csv`` and their paths are relative to the dataset
    ``<root>``, the CSV's grandparent's parent. The reader takes as root the nearest folder,
    from the CSV's own folder upwards, in which the first row's image exists (falling back
    to the grandparent's parent), so copies of the split elsewhere resolve too.

Class order (class id = index in `Manifest.class_names`), first rule that applies:
    1. the ``class_names`` argument; 2. a ``classes.txt`` (one name per line, ``#`` comments)
    in the dataset root or the CSV's folder; 3. `MT_CLASSES` when every class found is a
    Magnetic Tile class (ids then match the MT numbering even if a class is absent);
    4. the sorted class names. With rules 1 and 2 a class found in the data but missing
    from the list is an error; listed classes without samples are allowed (empty classes).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dli.common.errors import DliError
from dli.data.class_names import check_class_names
from dli.data.imageio import (
    IMAGE_EXTENSIONS,
    is_image_file,
)

FREE = -1
"""Class id of a defect-free image."""

FREE_NAME = "free"
"""Class name written for defect-free images."""

FREE_NAMES: tuple[str, ...] = (FREE_NAME, "ok", "good")
"""Folder or CSV class names that mean defect-free (compared lower-case)."""

MT_CLASSES: tuple[str, ...] = ("blowhole", "break", "crack", "fray", "uneven")
"""Magnetic Tile defect classes in their canonical order (class ids 0..4)."""

IMAGES_FOLDER = "Imgs"
"""Sub-folder of a class folder that holds its images and masks."""

CLASSES_FILE = "classes.txt"
"""Optional file fixing the class order, one name per line."""

PNG_MASK_SUFFIX = "_mask"
"""Stem suffix of the mask of an image that is itself a PNG (``a.png`` -> ``a_mask.png``)."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        mask: path of its mask (same size), or None for a defect-free image that ships without
            one (read as all zeros). A binary mask (``index_bits`` 0) is defect where its value
            is > 0 in its own bit depth (see `dli.data.imageio.MASK_THRESHOLD`), all of it
            of class `class_id`; an index mask holds value k + 1 where class k is (0 = background).
        class_id: `FREE` (-1) when the image holds no defect, else its first (lowest) class id.
        classes: every defect class id the image holds, ascending (empty for a defect-free image;
            ``(class_id,)`` when not given for a binary mask).
        index_bits: 0 for a binary mask, else the bit depth (8 or 16) of an index mask.
    """

    image: Path
    mask: Path | None
    class_id: int
    classes: tuple[int, ...] = ()
    index_bits: int = 0

    def __post_init__(self) -> None:
        classes = tuple(sorted({int(c) for c in self.classes}))
        if not classes and self.class_id != FREE:
            classes = (int(self.class_id),)
        if (classes[0] if classes else FREE) != self.class_id:
            raise ValueError(f"class_id {self.class_id} of {self.image} is not the first of {classes}")
        object.__setattr__(self, "classes", classes)

    @property
    def is_free(self) -> bool:
        return not self.classes


def labelled_sample(image: Path, mask: Path | None, classes: Iterable[int], index_bits: int) -> Sample:
    """A sample of an index mask holding `classes` (defect-free when empty)."""
    ordered = tuple(sorted(set(classes)))
    return Sample(image, mask, ordered[0] if ordered else FREE, ordered, index_bits)


@dataclass(frozen=True)
class Manifest:
    """An ordered list of samples and the names of the defect classes (index = class id)."""

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    root: Path = field(default=Path("."))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def class_ids(self) -> list[int]:
        """Each sample's `Sample.class_id` (its first class, `FREE` for none)."""
        return [s.class_id for s in self.samples]

    def class_sets(self) -> list[tuple[int, ...]]:
        """Each sample's `Sample.classes` (empty for a defect-free image)."""
        return [s.classes for s in self.samples]

    def has_several_classes(self) -> bool:
        """Whether some image holds more than one defect class."""
        return any(len(s.classes) > 1 for s in self.samples)

    def indices_by_class(self) -> dict[int, list[int]]:
        """Sample indices per class id, `FREE` included, every class key present (maybe empty).

        An image holding several classes is listed under each of them.
        """
        out: dict[int, list[int]] = {FREE: [], **{c: [] for c in range(self.num_classes)}}
        for i, s in enumerate(self.samples):
            for c in s.classes or (FREE,):
                out[c].append(i)
        return out

    def indices_by_class_set(self) -> dict[tuple[int, ...], list[int]]:
        """Sample indices per class set (the strata of a split), sets in first-seen order."""
        out: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s.classes, []).append(i)
        return out

    def counts(self) -> dict[int, int]:
        """Images holding each class (an image of two classes counts for both), `FREE` included."""
        return {c: len(v) for c, v in self.indices_by_class().items()}

    def subset(self, indices: Iterable[int]) -> Manifest:
        return Manifest(tuple(self.samples[i] for i in indices), self.class_names, self.root)

    def class_name(self, class_id: int) -> str:
        """The name of `class_id` (``free`` for `FREE`)."""
        return FREE_NAME if class_id == FREE else self.class_names[class_id]

    def class_set_name(self, sample: Sample) -> str:
        """The names of a sample's classes joined by ``+`` (``free`` for none)."""
        return "+".join(self.class_name(c) for c in sample.classes) or FREE_NAME

    def counts_by_name(self) -> dict[str, int]:
        """Image count per class name, defect classes in id order, then ``free``."""
        counts = self.counts()
        return {**{name: counts[c] for c, name in enumerate(self.class_names)}, FREE_NAME: counts[FREE]}

    def empty_classes(self) -> list[str]:
        """Names of the defect classes with no sample (e.g. after a small `apply_fraction`)."""
        counts = self.counts()
        return [name for c, name in enumerate(self.class_names) if counts[c] == 0]

    def sort_key(self, sample: Sample) -> str:
        """The image path relative to `root` (POSIX), identical on every machine."""
        try:
            return sample.image.relative_to(self.root).as_posix()
        except ValueError:
            return sample.image.as_posix()


# ---------------------------------------------------------------------------------------------
# Problems: every reader and the validator collect them, then raise one error listing them all.


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file: `kind` is a short category used in the summary line."""

    path: Path
    kind: str
    detail: str = ""

    def line(self) -> str:
        return f"  {self.path}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


def _summary(problems: Sequence[Problem], noun: str, source: Path | str) -> str:
    kinds = Counter(p.kind for p in problems)
    parts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    plural = noun if len(problems) == 1 else f"{noun}s"
    return f"{len(problems)} {plural} in dataset {source}: {parts}"


def problems_error(problems: Sequence[Problem], source: Path | str) -> DliError:
    """One `DliError`: a summary line, then one line per offending file."""
    return DliError("\n".join([_summary(problems, "problem", source), *(p.line() for p in problems)]))


class DatasetWarning(UserWarning):
    """Something suspicious but usable in a dataset (e.g. an empty mask in a defect class)."""


def warn_of_problems(problems: Sequence[Problem], source: Path | str, limit: int = 20) -> None:
    lines = [_summary(problems, "warning", source), *(p.line() for p in problems[:limit])]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (see ValidationReport.warnings)")
    warnings.warn(DatasetWarning("\n".join(lines)), stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Class names and their order.


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names listed in a ``classes.txt`` (one per line; blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DliError(f"cannot read class list {path}: {error}") from None
    names = [line.split("#", 1)[0].strip().lower() for line in text.splitlines()]
    return checked_class_names([n for n in names if n], str(path))


def checked_class_names(names: Sequence[str], origin: str) -> tuple[str, ...]:
    names = check_class_names((str(n).strip().lower() for n in names), origin)
    bad = [n for n in names if n in FREE_NAMES or "," in n]
    if bad:
        raise DliError(
            f"invalid defect class name(s) {bad} in {origin}: names must be non-empty, without commas, "
            f"and not one of {', '.join(FREE_NAMES)} (those mean defect-free)"
        )
    return names


def class_order(
    found: Iterable[str], explicit: Sequence[str] | None, classes_file: Path, where: Path
) -> tuple[tuple[str, ...], str | None]:
    """The class names in id order, and where an explicit list came from (None when derived)."""
    if explicit is not None:
        return checked_class_names(explicit, "class_names"), "class_names"
    if classes_file.is_file():
        return read_class_names(classes_file), str(classes_file)
    found = set(found)
    if found <= set(MT_CLASSES):
        return MT_CLASSES, None
    return check_class_names(sorted(found), f"the classes of {where}"), None


def unknown_class(name: str, origin: str | None) -> str:
    return f"class {name!r} is not listed in {origin}"


# ---------------------------------------------------------------------------------------------
# Readers.


def read_dataset(path: str | os.PathLike[str], *, class_names: Sequence[str] | None = None) -> Manifest:
    """Read a dataset in any supported format (formats in the module docstring).

    Raises `DliError` listing every unreadable row, unknown class or ambiguous file at once.
    File contents are not opened here: call `dli.data.validation.validate` for that.
    """
    path = Path(path).absolute()
    if path.is_dir():
        from dli.data.annotations import has_labelme_files, read_annotated
        from dli.data.index_masks import is_index_folder, read_index_folder

        if is_index_folder(path):
            return read_index_folder(path, class_names)
        class_folders = any((d / IMAGES_FOLDER).is_dir() for d in path.iterdir())
        if not class_folders and has_labelme_files(path):
            return read_annotated(path, class_names)
        return _read_folders(path, class_names)
    if path.is_file() and path.suffix.lower() == ".csv":
        from dli.data.csv_manifest import read_csv

        return read_csv(path, class_names)
    if path.is_file() and path.suffix.lower() == ".json":
        from dli.data.annotations import read_annotated

        return read_annotated(path, class_names)
    if not path.exists():
        raise DliError(f"dataset not found: {path}")
    raise DliError(
        f"not a dataset: {path} (expected a folder of <Class>/{IMAGES_FOLDER}/ folders, a folder of "
        "images/ + masks/ + classes.txt, a folder of images with labelme .json files, a COCO .json, "
        "or a .csv)"
    )


def _folder_class_names(folder_names: Sequence[str]) -> list[str]:
    """Class name of each class folder: lower-cased, ``MT_`` or a shared ``<P>_`` prefix dropped."""
    prefixes = {name.split("_", 1)[0] for name in folder_names if "_" in name}
    shared = len(folder_names) > 1 and len(prefixes) == 1 and all("_" in n for n in folder_names)
    names = []
    for name in folder_names:
        if name.startswith("MT_") or shared:
            name = name.split("_", 1)[1]
        names.append(name.lower())
    return names


def _read_folders(root: Path, class_names: Sequence[str] | None) -> Manifest:
    folders = sorted(d for d in root.iterdir() if (d / IMAGES_FOLDER).is_dir())
    if not folders:
        raise DliError(
            f"no class folders in {root}: expected <Class>/{IMAGES_FOLDER}/ or MT_<Class>/{IMAGES_FOLDER}/ "
            "sub-folders, images/ + masks/ + classes.txt, images with labelme .json files, a COCO .json "
            "file or a .csv manifest"
        )
    names = _folder_class_names([f.name for f in folders])
    clashes = sorted(n for n, k in Counter(names).items() if k > 1)
    if clashes:
        raise DliError(f"class folders in {root} give the same class name twice: {', '.join(clashes)}")
    free_folders = [f.name for f, n in zip(folders, names, strict=True) if n in FREE_NAMES]
    if len(free_folders) > 1:
        raise DliError(f"more than one defect-free folder in {root}: {', '.join(free_folders)}")
    order, origin = class_order(
        [n for n in names if n not in FREE_NAMES], class_names, root / CLASSES_FILE, root
    )

    samples: list[Sample] = []
    problems: list[Problem] = []
    for folder, name in zip(folders, names, strict=True):
        if name in FREE_NAMES:
            class_id = FREE
        elif name in order:
            class_id = order.index(name)
        else:
            problems.append(Problem(folder, "unknown class", unknown_class(name, origin)))
            continue
        pairs, folder_problems = _pair_images_and_masks(folder / IMAGES_FOLDER)
        problems += folder_problems
        for image, mask in pairs:
            samples.append(Sample(image, mask if (mask.exists() or class_id != FREE) else None, class_id))
    if problems:
        raise problems_error(problems, root)
    if not samples:
        raise DliError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return Manifest(tuple(samples), order, root)


def _pair_images_and_masks(folder: Path) -> tuple[list[tuple[Path, Path]], list[Problem]]:
    """(image, expected mask path) for every image in `folder`, by the rule in the module docstring."""
    files = sorted(p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith("."))
    non_png: dict[str, list[Path]] = defaultdict(list)
    png: dict[str, Path] = {}
    for p in files:
        if p.suffix.lower() == ".png":
            png[p.stem] = p
        else:
            non_png[p.stem].append(p)
    pairs: list[tuple[Path, Path]] = []
    problems: list[Problem] = []
    for stem, images in non_png.items():
        if len(images) > 1:
            problems += [
                Problem(p, "ambiguous image", f"{len(images)} images share the stem {stem!r}") for p in images
            ]
            continue
        pairs.append((images[0], png.get(stem, images[0].with_suffix(".png"))))
    for stem, p in png.items():
        if stem in non_png or stem.endswith(PNG_MASK_SUFFIX):
            continue
        mask_name = f"{stem}{PNG_MASK_SUFFIX}.png"
        pairs.append((p, png.get(f"{stem}{PNG_MASK_SUFFIX}", p.with_name(mask_name))))
    pairs.sort(key=lambda pair: pair[0].name)
    return pairs, problems
