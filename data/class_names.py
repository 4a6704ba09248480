"""Defect class names: the one check every way a name enters dli applies.

Class names come from a dataset (class folders, a CSV's `class` column, a ``classes.txt``),
from a checkpoint's `model_info` and from an export's ONNX metadata, and end up in output file
names (`dli predict` writes `<stem>_<class>.png`). `check_class_names` admits a list of names
only when every name is usable as part of a file name and the list is unambiguous:

- non-empty, at most `MAX_LENGTH` characters, no leading or trailing white space;
- no path separator (``/``, ``\\``), no ``..``, no NUL or other control character;
- unique, also when case is ignored (on a case-insensitive disk two such names would share
  one mask file).

Anything else is one `DliError` naming where the names came from and the offending name.
`output_name` builds a file name from an admitted name and refuses (rather than writes) any
name that would leave its folder, so a name that bypassed the check cannot escape either.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dli.common.errors import DliError

MAX_LENGTH = 100
"""Longest class name (characters): output file names add the image stem and stay under 255 bytes."""


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a class name, or None when it can."""
    if not isinstance(name, str):
        return f"{name!r} is not text"
    if not name:
        return "an empty name"
    if len(name) > MAX_LENGTH:
        return f"{name[:20]!r}... is longer than {MAX_LENGTH} characters"
    if name != name.strip():
        return f"{name!r} starts or ends with white space"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return f"{name!r} holds a control character"
    if "/" in name or "\\" in name:
        return f"{name!r} holds a path separator"
    if ".." in name:
        return f"{name!r} holds '..'"
    return None


def check_class_names(names: Iterable[object], origin: str) -> tuple[str, ...]:
    """`names` as a tuple when every name is admissible and unique; else `DliError` naming `origin`."""
    if isinstance(names, (str, bytes)):
        raise DliError(f"invalid class names in {origin}: a list of names is expected, not {names!r}")
    names = tuple(names)
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise DliError(f"invalid class name in {origin}: {problem}")
    folded = Counter(str(n).casefold() for n in names)
    duplicates = sorted({str(n) for n in names if folded[str(n).casefold()] > 1})
    if duplicates:
        raise DliError(f"class names listed twice in {origin}: {', '.join(duplicates)}")
    return tuple(str(n) for n in names)


def output_name(folder: Path, stem: str, class_name: str, suffix: str = ".png") -> Path:
    """`folder / "<stem>_<class_name><suffix>"`; `DliError` if that would not be a file of `folder`."""
    problem = name_problem(class_name)
    path = folder / f"{stem}_{class_name}{suffix}"
    if problem is not None or path.parent != folder or path.name in ("", ".", ".."):
        reason = problem or "outside the folder"
        raise DliError(f"refusing to write a file for class {class_name!r}: {reason}")
    return path
