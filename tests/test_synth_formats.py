"""`dli synth --format/--rgb/--classes-per-image/--no-free`: the data shapes dli reads, generated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.data.annotations import materialize, read_annotations
from dli.data.synth_formats import SynthOptions, data_path, generate_formatted

SMALL = ((48, 80), (48, 96))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "cache"))


def _generate(out: Path, **options: object) -> dict[str, int]:
    return generate_formatted(out, images=24, seed=5, size_range=SMALL, options=SynthOptions(**options))


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_index_masks_hold_several_classes_and_no_free_image(tmp_path: Path) -> None:
    counts = _generate(tmp_path / "idx", fmt="index", classes_per_image=3, free=False)
    assert counts["free"] == 0
    root = tmp_path / "idx"
    assert (root / "classes.txt").read_text().split() == ["blowhole", "break", "crack", "fray", "uneven"]
    values = [set(np.unique(np.asarray(Image.open(m)))) - {0} for m in sorted((root / "masks").glob("*.png"))]
    assert len(values) == 24 and all(values)  # every image holds a defect
    assert sum(len(v) > 1 for v in values) >= 3  # several hold more than one class
    assert set().union(*values) <= {1, 2, 3, 4, 5}
    assert sorted(p.stem for p in (root / "images").iterdir()) == sorted(
        p.stem for p in (root / "masks").iterdir()
    )
    assert sum(counts.values()) == sum(len(v) for v in values)


@pytest.mark.parametrize("fmt", ["coco", "labelme"])
def test_polygons_read_back_as_the_generating_masks(tmp_path: Path, fmt: str) -> None:
    """The written polygons, rasterized by pycocotools / labelme's convention, give back the index
    masks that the same seed writes as PNGs (up to overlaps and filled holes)."""
    _generate(tmp_path / "idx", fmt="index", classes_per_image=3)
    _generate(tmp_path / fmt, fmt=fmt, classes_per_image=3)
    result = materialize(read_annotations(data_path(tmp_path / fmt, SynthOptions(fmt=fmt))))
    assert len(result.pairs) == 24
    inter = union = identical = 0
    for image, mask in result.pairs:
        expected = np.asarray(Image.open(tmp_path / "idx" / "masks" / f"{image.stem}.png"))
        got = np.zeros_like(expected) if mask is None else np.asarray(Image.open(mask))
        inter += np.count_nonzero((got == expected) & (expected > 0))
        union += np.count_nonzero((got > 0) | (expected > 0))
        identical += bool((got == expected).all())
    assert inter / union > 0.995
    assert identical >= 20
    several = sum(len(c) > 1 for c in result.classes)
    assert several >= 1 and sum(not c for c in result.classes) >= 12  # MT's share of free images


def test_labelme_free_images_sit_in_good_without_json(tmp_path: Path) -> None:
    counts = _generate(tmp_path / "lm", fmt="labelme")
    good = sorted((tmp_path / "lm" / "good").iterdir())
    assert len(good) == counts["free"] > 0 and all(p.suffix == ".jpg" for p in good)
    document = json.loads(next((tmp_path / "lm").glob("*.json")).read_text())
    assert document["shapes"] and {s["shape_type"] for s in document["shapes"]} == {"polygon"}


def test_rgb_images_are_coloured(tmp_path: Path) -> None:
    from dli.data.imageio import looks_gray

    _generate(tmp_path / "rgb", fmt="index", rgb=True)
    for path in sorted((tmp_path / "rgb" / "images").iterdir()):
        with Image.open(path) as image:
            assert image.mode == "RGB" and not looks_gray(image), path.name  # so --channels auto picks 3


def test_mt_layout_without_free_images(tmp_path: Path) -> None:
    from dli.data.manifest import read_dataset

    _generate(tmp_path / "mt", fmt="mt", free=False, rgb=True)
    manifest = read_dataset(tmp_path / "mt")
    assert manifest.counts_by_name()["free"] == 0 and len(manifest) == 24
    with pytest.raises(DliError, match="one class per image"):
        _generate(tmp_path / "mt2", fmt="mt", classes_per_image=2)


def test_same_arguments_give_identical_files_and_output_is_replaced(tmp_path: Path) -> None:
    _generate(tmp_path / "a", fmt="coco", classes_per_image=2, rgb=True)
    _generate(tmp_path / "b", fmt="coco", classes_per_image=2, rgb=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    with pytest.warns(UserWarning, match="replacing the earlier dli synth dataset"):
        _generate(tmp_path / "a", fmt="labelme")  # a previous output is replaced, said aloud
    assert not (tmp_path / "a" / "annotations.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DliError, match="not empty"):
        _generate(tmp_path / "other", fmt="index")


def test_default_dli_synth_writes_the_mt_generator_files(tmp_path: Path) -> None:
    from dli.data.synth import generate

    assert main(["synth", str(tmp_path / "cli"), "--images", "12", "--seed", "2"]) == 0
    generate(tmp_path / "api", images=12, seed=2)
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "api")


def test_dli_synth_format_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    argv = ["synth", str(out), "--images", "12", "--format", "coco", "--classes-per-image", "2", "--no-free"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"--data {out / 'annotations.json'}" in printed and "free           0" in printed
    assert main(["synth", str(tmp_path / "d"), "--images", "12", "--classes-per-image", "9"]) == 2
    assert "classes per image must be 1..5" in capsys.readouterr().err
