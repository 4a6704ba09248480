"""Timing helpers of `dli bench`: images/s of a batch stream, seconds of a call, their summaries.

A figure is timed over windows after an untimed warm-up: `stream_rates` times `per_window`
batches of a stream per window (fetching each batch inside the window), `call_times` one call
per repeat (its `setup` outside). The caller's `sync` waits for the device at both ends of a
window, so queued GPU work is counted. `summary` reports the samples as median, min and max
with the samples themselves; `ratio` divides the median images/s of two such figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of timing samples, with the samples themselves."""
    values = [float(v) for v in samples]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "samples": values}


def stream_rates(
    batches: Iterator[T],
    step: Callable[[T], object],
    *,
    batch_size: int,
    warmup: int,
    per_window: int,
    windows: int,
    sync: Callable[[], None],
) -> list[float]:
    """Images/s of `step(next(batches))` in each of `windows` windows of `per_window` batches.

    Fetching the batch is inside the window: the loader's time is what is being measured.
    `sync` waits for the device at both ends of a window, so queued GPU work is counted.
    """
    for _ in range(warmup):
        step(next(batches))
    rates = []
    for _ in range(windows):
        sync()
        start = time.perf_counter()
        for _ in range(per_window):
            step(next(batches))
        sync()
        rates.append(per_window * batch_size / (time.perf_counter() - start))
    return rates


def call_times(
    call: Callable[..., object],
    *,
    repeats: int,
    sync: Callable[[], None],
    setup: Callable[[], tuple[Any, ...]] = tuple,
) -> list[float]:
    """Seconds of `call(*setup())` per repeat after one untimed call; `setup` (e.g. fresh copies of
    arrays that `call` writes in place) runs outside the timed region."""
    call(*setup())
    times = []
    for _ in range(repeats):
        arguments = setup()
        sync()
        start = time.perf_counter()
        call(*arguments)
        sync()
        times.append(time.perf_counter() - start)
    return times


def ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    return ours["images_per_s"]["median"] / theirs["images_per_s"]["median"]
