"""User-facing errors: bad data, bad flags, bad checkpoints.

Anything raised as `DliError` reaches the user as `dli: error: <message>` and exit status 2,
never as a traceback. The message names the offending file or value.
"""

from __future__ import annotations


class DliError(Exception):
    """An error caused by the user's input, reported without a traceback."""


def fail(message: str) -> DliError:
    """Build a `DliError` (use as `raise fail(...)`), keeping call sites short."""
    return DliError(message)
