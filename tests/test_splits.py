"""Stratified splits, labelled-data fractions and the published reference split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dli.common.errors import DliError
from dli.data.manifest import FREE, MT_CLASSES, Manifest, Sample, read_dataset
from dli.data.splits import (
    apply_fraction,
    kept_count,
    reference_split,
    stratified_split,
    validation_count,
)

MT_COUNTS = {0: 115, 1: 85, 2: 57, 3: 32, 4: 103, FREE: 952}


def fake_manifest(counts: dict[int, int], root: Path = Path("/data/mt"), reverse: bool = False) -> Manifest:
    """A manifest of `counts[class_id]` samples per class (splits never open the files)."""
    samples = [
        Sample(root / f"c{c}" / f"img_{i:04d}.jpg", root / f"c{c}" / f"img_{i:04d}.png", c)
        for c, n in counts.items()
        for i in range(n)
    ]
    if reverse:
        samples.reverse()
    return Manifest(tuple(samples), MT_CLASSES, root)


def names(manifest: Manifest) -> set[str]:
    return {manifest.sort_key(s) for s in manifest.samples}


def test_same_seed_same_split_on_any_root_and_file_order():
    train, val = stratified_split(fake_manifest(MT_COUNTS), seed=3)
    moved = fake_manifest(MT_COUNTS, root=Path("/elsewhere/copy"), reverse=True)
    train2, val2 = stratified_split(moved, seed=3)
    assert names(val) == names(val2) and names(train) == names(train2)


def test_different_seed_different_split():
    manifest = fake_manifest(MT_COUNTS)
    assert names(stratified_split(manifest, seed=0)[1]) != names(stratified_split(manifest, seed=1)[1])


def test_split_is_stratified_disjoint_and_complete():
    manifest = fake_manifest(MT_COUNTS)
    train, val = stratified_split(manifest, val_fraction=0.2, seed=0)
    assert val.counts() == {FREE: 0, 0: 23, 1: 17, 2: 12, 3: 7, 4: 21}  # as the reference split
    assert train.counts()[FREE] == 952
    assert not names(train) & names(val)
    assert names(train) | names(val) == names(manifest)
    assert train.class_names == val.class_names == MT_CLASSES
    # Order of the input is kept.
    assert list(val.samples) == [s for s in manifest.samples if s in set(val.samples)]


def test_split_free_splits_the_defect_free_images_too():
    train, val = stratified_split(fake_manifest(MT_COUNTS), val_fraction=0.25, seed=0, split_free=True)
    assert val.counts() == {c: validation_count(n, 0.25) for c, n in MT_COUNTS.items()}
    assert val.counts()[FREE] == 238 and train.counts()[FREE] == 952 - 238


def test_validation_count_rule():
    assert [validation_count(n, 0.2) for n in (0, 1, 2, 3, 5, 6, 57)] == [0, 0, 1, 1, 1, 2, 12]
    assert validation_count(4, 0.9) == 3  # at least one sample stays in training
    train, val = stratified_split(fake_manifest({0: 1, 1: 2, FREE: 3}), seed=0)
    assert val.counts() == {FREE: 0, 0: 0, 1: 1, 2: 0, 3: 0, 4: 0}
    assert train.counts() == {FREE: 3, 0: 1, 1: 1, 2: 0, 3: 0, 4: 0}


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, math.nan])
def test_bad_val_fraction_names_the_value(bad: float):
    with pytest.raises(DliError, match=f"val_fraction must be in \\(0, 1\\), got {bad!r}"):
        stratified_split(fake_manifest(MT_COUNTS), val_fraction=bad)


def test_negative_seed_is_rejected():
    with pytest.raises(DliError, match="seed must be a non-negative integer, got -1"):
        stratified_split(fake_manifest(MT_COUNTS), seed=-1)


# ---------------------------------------------------------------------------------------------
# Fractions.


def test_fraction_keeps_a_rounded_share_of_every_class():
    manifest = fake_manifest(MT_COUNTS)
    kept = apply_fraction(manifest, 0.1, seed=0)
    assert kept.counts() == {FREE: 95, 0: 12, 1: 9, 2: 6, 3: 3, 4: 10}
    assert kept.counts() == {c: kept_count(n, 0.1) for c, n in MT_COUNTS.items()}
    assert names(kept) <= names(manifest)
    assert apply_fraction(manifest, 1.0, seed=5).samples == manifest.samples


def test_fraction_is_deterministic_and_nested():
    manifest = fake_manifest(MT_COUNTS)
    quarter = apply_fraction(manifest, 0.25, seed=7)
    assert apply_fraction(fake_manifest(MT_COUNTS, reverse=True), 0.25, seed=7).samples == tuple(
        reversed(quarter.samples)
    )
    assert names(apply_fraction(manifest, 0.25, seed=8)) != names(quarter)
    assert (
        names(apply_fraction(manifest, 0.1, seed=7))
        <= names(quarter)
        <= names(apply_fraction(manifest, 0.5, seed=7))
    )


def test_small_fraction_may_empty_a_class():
    kept = apply_fraction(fake_manifest({0: 40, 3: 3, FREE: 50}), 0.1, seed=0)
    assert kept.counts()[3] == 0
    assert kept.empty_classes() == ["break", "crack", "fray", "uneven"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, math.nan, True])
def test_bad_fraction_names_the_value(bad: float):
    with pytest.raises(DliError, match=f"fraction must be in \\(0, 1\\], got {bad!r}"):
        apply_fraction(fake_manifest(MT_COUNTS), bad, seed=0)


def test_kept_count_rounds_halves_up():
    assert [kept_count(n, 0.5) for n in (1, 2, 3, 5)] == [1, 1, 2, 3]
    assert kept_count(32, 0.1) == 3 and kept_count(3, 0.1) == 0


# ---------------------------------------------------------------------------------------------
# Reference split.


def test_missing_reference_split_names_the_file(tmp_path: Path):
    with pytest.raises(DliError, match=r"reference split file not found: .*reference-seed42/train_data\.csv"):
        reference_split(tmp_path)


@pytest.mark.realdata
def test_real_reference_split(mt_root: Path):
    train, val = reference_split(mt_root)
    assert len(val) == 80 and len(train) == 1264
    assert val.counts() == {FREE: 0, 0: 23, 1: 17, 2: 12, 3: 7, 4: 21}
    assert train.counts()[FREE] == 952
    everything = read_dataset(mt_root)
    assert not set(train.samples) & set(val.samples)
    assert set(train.samples) | set(val.samples) == set(everything.samples)


@pytest.mark.realdata
def test_stratified_split_of_real_data_matches_reference_counts(mt_root: Path):
    train, val = stratified_split(read_dataset(mt_root), seed=42)
    reference_train, reference_val = reference_split(mt_root)
    assert val.counts() == reference_val.counts() and train.counts() == reference_train.counts()


# ---------------------------------------------------------------------------------------------
# Class sets and groups.


def group_manifest(root: Path = Path("/data/parts")) -> Manifest:
    """30 parts of 1-4 frames each; a part's frames share its classes (one or two, or none)."""
    import numpy as np

    rng = np.random.default_rng(4)
    samples = []
    for part in range(30):
        classes = [(), (0,), (1,), (0, 2)][part % 4]
        for frame in range(int(rng.integers(1, 5))):
            stem = f"part{part:02d}_frame{frame}"
            image = root / "images" / f"{stem}.png"
            samples.append(
                Sample(image, root / "masks" / f"{stem}.png", classes[0] if classes else FREE, classes)
            )
    samples.append(Sample(root / "images" / "stray.png", root / "masks" / "stray.png", 1))
    return Manifest(tuple(samples), ("a", "b", "c"), root)


def test_images_of_several_classes_form_their_own_stratum() -> None:
    manifest = group_manifest()
    _, val = stratified_split(manifest, val_fraction=0.25, seed=0)
    for classes in [(0,), (1,), (0, 2)]:
        total = sum(s.classes == classes for s in manifest.samples)
        assert sum(s.classes == classes for s in val.samples) == validation_count(total, 0.25)
    assert not any(s.is_free for s in val.samples)


def test_group_split_keeps_each_part_on_one_side_and_counts_the_groups() -> None:
    from dli.data.splits import group_split

    manifest = group_manifest()
    train, val, groups = group_split(manifest, r"part(\d+)_", val_fraction=0.25, seed=3)
    part = {s.image.name.split("_")[0] for s in train.samples}
    assert part.isdisjoint({s.image.name.split("_")[0] for s in val.samples})
    assert len(train) + len(val) == len(manifest)
    assert groups.unmatched == 1 and groups.train + groups.val == 31
    assert groups.val == len({s.image.name.split("_")[0] for s in val.samples}) > 0
    for classes in [(0,), (1,), (0, 2)]:  # every class set reaches validation
        assert any(s.classes == classes for s in val.samples)
    assert not any(s.is_free for s in val.samples)  # free-only groups stay in training
    again = group_split(manifest, r"part(\d+)_", val_fraction=0.25, seed=3)
    assert again[1].samples == val.samples
    assert "groups: " in groups.line() and "1 image(s) matched no group" in groups.line()


def test_group_by_is_checked_before_reading(tmp_path: Path) -> None:
    from dli.cli import main

    assert main(["train", "--data", str(tmp_path), "--group-by", "part(\\d+", "--device", "cpu"]) == 2
    argv = ["train", "--data", str(tmp_path), "--group-by", "p(\\d)", "--split", "reference"]
    assert main([*argv, "--device", "cpu"]) == 2
