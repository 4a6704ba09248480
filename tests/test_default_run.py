"""The bundled default run (`dli train` without arguments) is configured as README.md says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dli.data.synth import BUNDLED_IMAGES, BUNDLED_SIZE_RANGE, DEFAULT_SIZE_RANGE
from dli.training.config import PAPER_SCHEDULE, QUICK_SCHEDULE, TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"

SCHEDULE = (
    r"for (\d+) epochs of batch (\d+) at (\d+) px with learning rate ([0-9.e-]+) "
    r"\(`--data` runs get the paper's (\d+) epochs of batch (\d+) at (\d+) px "
    r"with learning rate ([0-9.e-]+)\)"
)


def readme() -> str:
    return " ".join(README.read_text(encoding="utf-8").split())  # line breaks as spaces


def test_readme_states_the_default_schedules():
    found = re.search(SCHEDULE, readme())
    assert found, "README.md no longer states the default schedule in the expected words"
    quick = (int(found[1]), int(found[2]), int(found[3]), float(found[4]))
    paper = (int(found[5]), int(found[6]), int(found[7]), float(found[8]))
    q, p = QUICK_SCHEDULE, PAPER_SCHEDULE
    assert quick == (q.epochs, q.batch_size, q.image_size, q.lr)
    assert paper == (p.epochs, p.batch_size, p.image_size, p.lr)


def test_readme_states_the_bundled_dataset():
    found = re.search(r"generates (\d+) synthetic MT-like tiles at half Magnetic Tile's sizes", readme())
    assert found and int(found[1]) == BUNDLED_IMAGES
    (h0, h1), (w0, w1) = BUNDLED_SIZE_RANGE
    (mh0, mh1), (mw0, mw1) = DEFAULT_SIZE_RANGE
    assert (h0, h1, w0, w1) == (mh0 // 2, mh1 // 2, mw0 // 2, mw1 // 2)


def test_the_default_resolves_to_the_quick_schedule_and_data_to_the_paper():
    quick = TrainConfig().validate().resolved()
    assert quick.data is None
    assert (quick.epochs, quick.batch_size, quick.image_size, quick.lr) == (
        QUICK_SCHEDULE.epochs,
        QUICK_SCHEDULE.batch_size,
        QUICK_SCHEDULE.image_size,
        QUICK_SCHEDULE.lr,
    )
    paper = TrainConfig(data="/some/MT").validate().resolved()
    assert (paper.epochs, paper.batch_size, paper.image_size, paper.lr) == (1000, 64, 256, 5e-4)


@pytest.mark.parametrize("data", [None, "/some/MT"])
def test_flags_given_win_over_either_schedule(data):
    config = TrainConfig(data=data, epochs=2, batch_size=4, image_size=96, lr=1e-4).resolved()
    assert (config.epochs, config.batch_size, config.image_size, config.lr) == (2, 4, 96, 1e-4)
    assert TrainConfig(data=data, lr=5e-4).resolved().lr == 5e-4  # the paper's value, asked for


def test_the_learning_rate_is_checked_when_given():
    from dli.common.errors import DliError

    with pytest.raises(DliError, match=r"--lr 0\.0: must be > 0"):
        TrainConfig(lr=0.0).validate()
