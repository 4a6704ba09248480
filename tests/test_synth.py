"""Synthetic MT-like data: determinism, imbalance, mask areas, layout, cache and `dli synth`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.data.manifest import FREE, MT_CLASSES, read_dataset
from dli.data.synth import (
    BUNDLED_SIZE_RANGE,
    DEFAULT_SIZE_RANGE,
    GENERATOR_VERSION,
    MARKER_FILE,
    MASK_AREA_RANGES,
    class_counts,
    default_dataset,
    generate,
)
from dli.data.validation import validate


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    """A 150-image synthetic dataset (about 44 defect images, at least 4 per class)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return generate(out, images=150, seed=11)


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    generate(tmp_path / "a", images=20, seed=4)
    generate(tmp_path / "b", images=20, seed=4)
    generate(tmp_path / "c", images=20, seed=5)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 20 + 1  # images, masks, marker
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)


def test_class_counts_follow_mt():
    assert class_counts(1344) == {FREE: 952, 0: 115, 1: 85, 2: 57, 3: 32, 4: 103}
    for images in (10, 37, 200, 240, 1000):
        counts = class_counts(images)
        assert sum(counts.values()) == images
        assert counts[FREE] > images / 2
        by_mt_size = [counts[c] for c in (0, 4, 1, 2, 3)]  # MT: blowhole > uneven > break > crack > fray
        assert by_mt_size == sorted(by_mt_size, reverse=True), images


def test_dataset_reads_back_and_is_imbalanced_like_mt(dataset):
    assert dataset.class_names == MT_CLASSES
    assert dataset.counts() == class_counts(150)
    counts = dataset.counts_by_name()
    assert counts["free"] > sum(counts[n] for n in MT_CLASSES)
    assert counts["blowhole"] > counts["uneven"] > counts["break"] > counts["crack"] > counts["fray"] > 0
    for sample in dataset.samples:
        folder = "MT_Free" if sample.class_id == FREE else f"MT_{MT_CLASSES[sample.class_id].capitalize()}"
        assert sample.image.parent == dataset.root / folder / "Imgs"
        assert sample.image.suffix == ".jpg" and sample.mask == sample.image.with_suffix(".png")


def test_dataset_validates_with_areas_in_the_documented_ranges(dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty mask anywhere
        report = validate(dataset)
    for class_id, indices in dataset.indices_by_class().items():
        areas = report.mask_fractions[indices]
        if class_id == FREE:
            assert np.all(areas == 0)
            continue
        low, high = MASK_AREA_RANGES[MT_CLASSES[class_id]]
        assert np.all((areas >= low) & (areas <= high)), (MT_CLASSES[class_id], areas)
    (h0, h1), (w0, w1) = DEFAULT_SIZE_RANGE
    assert all(h0 <= h <= h1 and w0 <= w <= w1 for h, w in report.image_sizes)
    assert len(set(report.image_sizes)) > len(dataset) // 2  # sizes vary


def test_images_look_like_mt_tiles(dataset):
    means, values = [], set()
    for sample in dataset.samples[:40]:
        image = Image.open(sample.image)
        mask = Image.open(sample.mask)
        assert image.mode == "L" and mask.mode == "L" and image.size == mask.size
        means.append(np.asarray(image).mean() / 255)
        values |= set(np.unique(np.asarray(mask)).tolist())
    assert 0.36 < np.mean(means) < 0.50  # MT: 0.43
    assert values <= {0, 255}


def test_defects_stand_out_from_their_tile(dataset):
    # What makes the classes learnable at 64 px: every defect's mean intensity differs from the
    # rest of its tile by at least 10%, and a fray (an edge band) is darker than its tile.
    for sample in dataset.samples:
        if sample.class_id == FREE:
            continue
        image = np.asarray(Image.open(sample.image), dtype=np.float64)
        mask = np.asarray(Image.open(sample.mask)) > 0
        inside, outside = image[mask].mean(), image[~mask].mean()
        name = MT_CLASSES[sample.class_id]
        assert abs(inside - outside) >= 0.1 * outside, (name, sample.image.name, inside, outside)
        if name == "fray":
            assert inside < 0.9 * outside, (sample.image.name, inside, outside)


def test_uneven_patches_lie_inside_the_tile(dataset):
    # A band along a whole edge is a fray: an uneven patch covers no edge of its tile (an edge
    # band would cover all of one).
    for sample in dataset.samples:
        if sample.class_id == MT_CLASSES.index("uneven"):
            mask = np.asarray(Image.open(sample.mask)) > 0
            covered = max(mask[0].mean(), mask[-1].mean(), mask[:, 0].mean(), mask[:, -1].mean())
            assert covered < 0.8, (sample.image.name, covered)


def test_refuses_an_unrelated_non_empty_folder(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DliError, match="is not empty and does not hold a dataset from dli synth"):
        generate(tmp_path, images=10)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DliError, match="not a folder"):
        generate(tmp_path / "file", images=10)


def test_replaces_its_own_previous_output(tmp_path: Path):
    out = tmp_path / "data"
    out.mkdir()  # an empty folder is fine too
    generate(out, images=30, seed=0)
    with pytest.warns(UserWarning, match="replacing the earlier dli synth dataset in .*data"):
        manifest = generate(out, images=12, seed=1)
    assert len(manifest) == 12 and len(read_dataset(out)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folders left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 9}, "images must be an integer >= 10, got 9"),
        ({"seed": -2}, "seed must be a non-negative integer, got -2"),
        ({"size_range": ((100, 50), (60, 80))}, "size_range must be"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs, message):
    with pytest.raises(DliError, match=message):
        generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_default_dataset_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "cache"))
    path = default_dataset(images=20, seed=2)
    assert path == tmp_path / "cache" / f"synth-v{GENERATOR_VERSION}-n20-s2"
    marker_time = (path / MARKER_FILE).stat().st_mtime_ns
    assert default_dataset(images=20, seed=2) == path
    assert (path / MARKER_FILE).stat().st_mtime_ns == marker_time  # reused, not regenerated
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
    assert len(read_dataset(path)) == 20
    (h0, h1), (w0, w1) = BUNDLED_SIZE_RANGE  # the bundled data: half Magnetic Tile's sizes
    sizes = validate(read_dataset(path)).image_sizes
    assert all(h0 <= h <= h1 and w0 <= w <= w1 for h, w in sizes) and max(h for h, _ in sizes) < 222


def test_dli_synth_command(tmp_path: Path, capsys):
    out = tmp_path / "synthetic"
    assert main(["synth", str(out), "--images", "20", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote 20 images to {out}" in stdout
    table = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines()[2:]}
    assert table == {**read_dataset(out).counts_by_name(), "total": 20}


def test_dli_synth_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--images", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dli synth: error: images must be an integer >= 10, got 5"
