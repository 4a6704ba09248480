"""User-facing errors: bad data, bad flags, bad checkpoints.

Anything raised as `DliError` reaches the user as `dli: error: <message>` and exit status 2,
never as a traceback. The message names the offending file or value. An `OSError` that reaches
the command line (a folder that cannot be created, a full disk) is reported the same way, by
`os_error_message`.
"""

from __future__ import annotations


class DliError(Exception):
    """An error caused by the user's input, reported without a traceback."""


def fail(message: str) -> DliError:
    """Build a `DliError` (use as `raise fail(...)`), keeping call sites short."""
    return DliError(message)


def one_line(text: object) -> str:
    """`text` on one line: runs of white space (newlines of a library's message) become one space."""
    return " ".join(str(text).split())


def os_error_message(error: OSError) -> str:
    """One line for an operating-system error: the path(s) it names and what the system said."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason
