"""`dli data`: what training would see of a dataset, in every format, and its problems."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dli.cli import main
from dli.data.synth_formats import SynthOptions, data_path, generate_formatted

SMALL = ((48, 80), (48, 96))
NAMES = ("blowhole", "break", "crack", "fray", "uneven")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "cache"))


def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in (*NAMES, "free"):
            rows[cells[0]] = cells[1:]
    return rows


def _expected_from_index_masks(masks: Path) -> tuple[dict[str, int], dict[str, list[int]], int]:
    """Images and instance areas per class, and multi-class images, counted from the PNGs directly."""
    images = dict.fromkeys(NAMES, 0)
    areas: dict[str, list[int]] = {n: [] for n in NAMES}
    several = 0
    for path in sorted(masks.glob("*.png")):
        index = np.asarray(Image.open(path))
        values = [int(v) for v in np.unique(index) if v]
        several += len(values) > 1
        for value in values:
            images[NAMES[value - 1]] += 1
            components, _ = ndimage.label(index == value, structure=np.ones((3, 3)))
            areas[NAMES[value - 1]] += np.bincount(components.ravel())[1:].tolist()
    return images, areas, several


@pytest.mark.parametrize("fmt", ["index", "coco"])
def test_counts_match_the_masks(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    options = SynthOptions(fmt=fmt, classes_per_image=3, rgb=True)
    generate_formatted(tmp_path / "d", images=24, seed=5, size_range=SMALL, options=options)
    generate_formatted(
        tmp_path / "idx", images=24, seed=5, size_range=SMALL, options=SynthOptions("index", True, 3)
    )
    assert main(["data", str(data_path(tmp_path / "d", options))]) == 0
    out = capsys.readouterr().out
    images, areas, several = _expected_from_index_masks(tmp_path / "idx" / "masks")
    table = _table(out)
    free = (
        24
        - len(list((tmp_path / "idx" / "masks").glob("*.png")))
        + sum(1 for p in (tmp_path / "idx" / "masks").glob("*.png") if not np.asarray(Image.open(p)).any())
    )
    assert int(table["free"][0]) == free
    assert f"{several} with several classes" in out
    assert "channels: 0 look gray, 24 colour (stored as RGB 24); --channels auto: 3 (colour)" in out
    assert "index masks rasterized from the annotations: " in out or fmt == "index"
    assert "no problem found" in out
    for name in NAMES:
        assert int(table[name][0]) == images[name], name
        if fmt == "index":  # the index masks themselves: exact instance counts and areas
            assert int(table[name][1]) == len(areas[name]), name
            if areas[name]:
                assert [int(v) for v in table[name][2:6]] == [
                    min(areas[name]),
                    int(np.median(areas[name])),
                    max(areas[name]),
                    sum(areas[name]),
                ]
        else:  # polygons filled: about the same instances
            assert abs(int(table[name][1]) - len(areas[name])) <= 1, name
    sizes = re.search(r"sizes: height (\d+)\.\.(\d+)", out)
    assert sizes and SMALL[0][0] <= int(sizes[1]) <= int(sizes[2]) <= SMALL[0][1]


def test_every_problem_is_listed_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = SynthOptions(fmt="coco")
    generate_formatted(tmp_path / "d", images=12, seed=1, size_range=SMALL, options=options)
    path = data_path(tmp_path / "d", options)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 42
    data["images"][1]["width"] += 3
    path.write_text(json.dumps(data))
    assert main(["data", str(path)]) == 2
    out = capsys.readouterr().out
    assert "2 problems in dataset" in out
    assert "unknown category id" in out and "image size differs" in out


def test_warnings_count_as_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "mt"
    for folder, value in (("MT_Crack", 0), ("MT_Free", None)):
        (root / folder / "Imgs").mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / folder / "Imgs" / "a.jpg")
        if value is not None:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / folder / "Imgs" / "a.png")
    assert main(["data", str(root)]) == 2
    out = capsys.readouterr().out
    assert "1 problem:" in out and "warning:" in out and "empty mask" in out
    assert "images: 2: 1 with defects (0 with several classes), 1 defect-free" in out
    assert "channels: 2 look gray, 0 colour (stored as L 2); --channels auto: 1 (gray)" in out
