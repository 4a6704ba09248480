"""Progress for long jobs: shown on a terminal, silent on a redirected stream.

A bar (tqdm) or a status line goes to stderr only when stderr is a terminal, so logs and pipes
receive the results and the error lines, never carriage-return redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it", **options: Any
) -> Any:
    """`iterable` wrapped in a tqdm bar on a terminal; `iterable` itself otherwise."""
    if not on_terminal():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **options)


def status(line: str) -> None:
    """Print `line` to stderr when it is a terminal (what a long silent step is doing)."""
    if on_terminal():
        print(line, file=sys.stderr, flush=True)


def items(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Iterate `iterable` with a bar on a terminal (closed at the end)."""
    wrapped = bar(iterable, total=total, desc=desc, unit=unit, leave=False)
    try:
        yield from wrapped
    finally:
        close = getattr(wrapped, "close", None)
        if close is not None and wrapped is not iterable:
            close()
