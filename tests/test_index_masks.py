"""Index-mask datasets (several classes per image), defect instances as donors, and canvases."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.data.index_masks import read_index_folder
from dli.data.instances import DonorTable, measure_instances
from dli.data.manifest import FREE, read_dataset
from dli.data.validation import validate
from dli.pipeline.loader import build_loader
from dli.pipeline.placement import output_box, overlaps
from dli.pipeline.planner import DliConfig, plan_batch

CLASSES = ("scratch", "pit", "stain")
SIDE = 32


def _blob(rng: np.random.Generator, index: np.ndarray, value: int) -> None:
    """Draw one or two rectangles of `value` into `index` (some classes get two instances)."""
    for _ in range(int(rng.integers(1, 3))):
        h, w = (int(v) for v in rng.integers(3, 8, size=2))
        top, left = int(rng.integers(0, SIDE - h)), int(rng.integers(0, SIDE - w))
        index[top : top + h, left : left + w] = value


def write_index_dataset(
    root: Path, images: int = 24, *, free: int = 4, seed: int = 0, bits: int = 8, classes=CLASSES
) -> Path:
    """`images/` + `masks/` + `classes.txt`: gray images, index masks with 1-3 classes each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for n in range(images):
        index = np.zeros((SIDE, SIDE), dtype=np.uint16 if bits == 16 else np.uint8)
        if n >= free:
            present = rng.choice(len(classes), size=int(rng.integers(1, len(classes) + 1)), replace=False)
            for c in sorted(present):
                _blob(rng, index, int(c) + 1)
        gray = rng.integers(90, 130, size=(SIDE, SIDE)).astype(np.uint8)
        gray[index > 0] = 200
        Image.fromarray(gray, mode="L").save(root / "images" / f"img_{n:03d}.png")
        Image.fromarray(index).save(root / "masks" / f"img_{n:03d}.png")
    return root


@pytest.fixture(scope="module")
def index_data(tmp_path_factory) -> Path:
    return write_index_dataset(tmp_path_factory.mktemp("index") / "data")


# ---------------------------------------------------------------------------------------------
# Reading and validation.


@pytest.mark.parametrize("bits", [8, 16])
def test_index_masks_give_each_image_its_classes(tmp_path: Path, bits: int) -> None:
    root = write_index_dataset(tmp_path / "data", images=10, free=2, bits=bits)
    manifest = read_dataset(root)
    assert manifest.class_names == CLASSES
    for sample in manifest.samples:
        values = np.unique(np.asarray(Image.open(sample.mask)))
        assert sample.classes == tuple(int(v) - 1 for v in values if v > 0)
        assert sample.index_bits == bits
    assert sum(s.class_id == FREE for s in manifest.samples) == 2
    assert manifest.has_several_classes()
    counts = manifest.counts()  # an image of several classes counts for each
    assert sum(counts[c] for c in range(3)) == sum(len(s.classes) for s in manifest.samples)


def test_a_class_list_that_misses_a_mask_value_names_the_file(tmp_path: Path) -> None:
    root = write_index_dataset(tmp_path / "data", images=8, free=0)
    (root / "classes.txt").write_text("scratch\npit\n")  # value 3 has no class
    offenders = [p for p in sorted((root / "masks").iterdir()) if 3 in np.asarray(Image.open(p))]
    assert offenders
    with pytest.raises(DliError) as caught:
        read_index_folder(root)
    message = str(caught.value)
    assert all(str(p) in message for p in offenders) and "mask value not in the class list" in message
    assert "values 3" in message
    assert main(["train", "--data", str(root), "--epochs", "1", "--device", "cpu"]) == 2


def test_a_several_valued_mask_given_as_one_class_is_an_error(tmp_path: Path) -> None:
    root = write_index_dataset(tmp_path / "data", images=6, free=0)
    rows = ["image,mask,class"] + [
        f"images/{p.name},masks/{p.name},scratch" for p in sorted((root / "images").iterdir())
    ]
    (root / "rows.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").unlink()
    manifest = read_dataset(root / "rows.csv")
    several = [s.mask for s in manifest.samples if len(np.unique(np.asarray(Image.open(s.mask)))) > 2]
    assert several
    with pytest.raises(DliError) as caught:
        validate(manifest)
    message = str(caught.value)
    assert "several classes in a single-class mask" in message
    assert all(str(p) in message for p in several)


def test_anti_aliased_binary_masks_are_not_taken_for_index_masks(tmp_path: Path) -> None:
    (tmp_path / "MT_Crack" / "Imgs").mkdir(parents=True)
    image = np.full((16, 16), 100, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 4:10] = 255
    mask[3, 4:10] = [12, 80, 140, 200, 254, 3]  # anti-aliased edge values
    Image.fromarray(image).save(tmp_path / "MT_Crack" / "Imgs" / "a.jpg")
    Image.fromarray(mask).save(tmp_path / "MT_Crack" / "Imgs" / "a.png")
    report = validate(read_dataset(tmp_path))
    assert report.ok and len(report.instances[0]) == 1


# ---------------------------------------------------------------------------------------------
# Instances.


def test_instances_are_the_connected_components_of_each_class() -> None:
    labels = np.zeros((10, 12), np.uint8)
    labels[1:3, 1:4] = 1  # class 0, instance 1
    labels[6:9, 8:11] = 1  # class 0, instance 2
    labels[3:5, 4:6] = 2  # class 1, touches class 0 at a corner: still its own instance
    labels[3, 3] = 2
    instances = measure_instances(labels, gap=0)  # plain connected components
    assert [(i.class_id, i.top, i.left, i.bottom, i.right, i.area) for i in instances] == [
        (0, 1, 1, 3, 4, 6),
        (0, 6, 8, 9, 11, 9),
        (1, 3, 3, 5, 6, 5),
    ]
    for instance in instances:
        full = instance.full_mask()
        assert full.sum() == instance.area and (labels[full > 0] == instance.class_id + 1).all()
    assert instances[1].box == (0.6, 8 / 12, 0.9, 11 / 12)
    # By default components whose 2-pixel dilations touch are one instance: the two class-0
    # pieces, 5 pixels apart (Chebyshev), merge; their pixels stay their own.
    merged = measure_instances(labels)
    assert [(i.class_id, i.top, i.left, i.bottom, i.right, i.area) for i in merged] == [
        (0, 1, 1, 9, 11, 15),
        (1, 3, 3, 5, 6, 5),
    ]
    assert (merged[0].full_mask() == (labels == 1)).all()
    labels[6:9, 8:11] = 0
    labels[7:9, 9:12] = 1  # now 6 pixels apart: two instances again
    assert len(measure_instances(labels)) == 3


def test_validation_measures_per_class_fractions_and_instances(index_data: Path) -> None:
    manifest = read_dataset(index_data)
    report = validate(manifest)
    for row, sample in enumerate(manifest.samples):
        index = np.asarray(Image.open(sample.mask)).astype(np.int64)
        expected = [np.count_nonzero(index == c + 1) / index.size for c in range(3)]
        np.testing.assert_allclose(report.class_fractions[row], expected)
        painted = np.zeros_like(index)
        for instance in report.instances[row]:
            painted += instance.full_mask() * (instance.class_id + 1)
        np.testing.assert_array_equal(painted, index)  # instances tile the mask exactly


# ---------------------------------------------------------------------------------------------
# Label channels through DALI, exactly.


@pytest.mark.parametrize("bits", [8, 16])
def test_label_channels_hold_the_index_masks_exactly(tmp_path: Path, bits: int) -> None:
    # DALI's decoder scales 16-bit PNGs to 8 bits by default: 16-bit index values must survive.
    manifest = read_dataset(write_index_dataset(tmp_path / "data", images=12, free=2, bits=bits))
    loader = build_loader(manifest, batch_size=8, image_size=SIDE, train=False, resize="nearest")
    seen = 0
    for batch in loader:
        for n in range(len(batch)):
            sample = manifest.samples[seen + n]
            index = np.asarray(Image.open(sample.mask))
            expected = np.stack([index == c + 1 for c in range(3)]).astype(np.float32)
            np.testing.assert_array_equal(batch.masks[n].numpy(), expected)
        seen += len(batch)
    assert seen == len(manifest)


# ---------------------------------------------------------------------------------------------
# Planner: class occurrences and canvases.


def test_an_image_of_two_classes_counts_for_both() -> None:
    pool = {0: [0], 1: [1], 2: [2]}
    plan = plan_batch(
        [0, FREE], pool, np.random.default_rng(0), DliConfig(), 3, class_sets=[(0, 1), ()], size=(32, 32)
    )
    # Counts before: 1/1/0, so the one free slot must take class 2, the rarest.
    assert plan.counts(after=False).tolist() == [1, 1, 0]
    assert [i.class_id for i in plan.injections] == [2]
    assert plan.class_sets_after == ((0, 1), (2,))


def test_canvas_free_injects_nothing_without_free_images_and_any_avoids_the_defects() -> None:
    pool = {0: [0], 1: [1]}
    donor_boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.4, 0.4, 0.6, 0.6]])
    canvas_boxes = [np.array([[0.0, 0.0, 0.5, 0.5]]), np.array([[0.5, 0.5, 1.0, 1.0]])]
    common = {
        "size": (64, 64),
        "class_sets": [(0,), (1,)],
        "donor_samples": [0, 1],
        "donor_boxes": donor_boxes,
        "canvas_boxes": canvas_boxes,
    }
    free = plan_batch([0, 1], pool, np.random.default_rng(0), DliConfig(canvas="free"), 2, **common)
    assert not free.injections
    for seed in range(20):
        plan = plan_batch([0, 1], pool, np.random.default_rng(seed), DliConfig(canvas="auto"), 2, **common)
        assert plan.injections
        for injection in plan.injections:
            region = output_box(donor_boxes[injection.donor], injection.source_matrix, (64, 64), 3)
            occupied = np.array(
                [output_box(b, np.eye(2, 3), (64, 64), 0) for b in canvas_boxes[injection.slot]]
            )
            assert not overlaps(region, occupied)


def test_dli_without_free_images_injects_into_defect_free_areas(tmp_path: Path) -> None:
    root = write_index_dataset(tmp_path / "data", images=16, free=0, seed=3)
    manifest = read_dataset(root)
    report = validate(manifest)
    instances = dict(zip(manifest.samples, report.instances, strict=True))
    donors = DonorTable.from_instances(manifest, instances)
    canvas_boxes = [np.array([i.box for i in inst]).reshape(-1, 4) for inst in report.instances]
    loader = build_loader(
        manifest,
        batch_size=8,
        image_size=SIDE,
        train=True,
        dli=DliConfig(canvas="auto", poisson_prob=0.5),
        donors=donors,
        canvas_boxes=canvas_boxes,
        seed=1,
    )
    plans = [p for epoch in range(2) for p in loader.plans(epoch)]
    injections = [(p, i) for p in plans for i in p.injections]
    assert len(injections) >= len(plans)  # every batch receives defects
    assert all(p.class_sets_before[i.slot] for p, i in injections)  # into defective canvases
    checked = 0
    for plan in plans[:2]:
        batch = loader.replay(plan)
        for slot, index in enumerate(plan.batch_indices):
            mask = np.asarray(Image.open(manifest.samples[index].mask))
            flip = plan.image_matrices[slot]
            mask = mask[:, ::-1] if flip[0, 0] < 0 else mask
            mask = mask[::-1, :] if flip[1, 1] < 0 else mask
            labels = batch.masks[slot].numpy() > 0
            for c in range(3):
                # The canvas's own defects keep their class, and no injected label covers them.
                assert labels[c][mask == c + 1].all()
                assert not labels[c][(mask > 0) & (mask != c + 1)].any()
            added = labels.any(axis=0) & (mask == 0)
            injected_here = [i for i in plan.injections if i.slot == slot]
            assert added.any() == bool(injected_here) or not injected_here
            checked += bool(added.any())
    assert checked > 0


def test_canvas_free_without_free_images_stops_training(tmp_path: Path, capsys) -> None:
    root = write_index_dataset(tmp_path / "data", images=12, free=0)
    argv = ["train", "--data", str(root), "--canvas", "free", "--epochs", "1", "--device", "cpu"]
    argv += ["--image-size", "32", "--batch-size", "4", "--no-pretrained", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no defect-free image" in err[0] and "--canvas auto" in err[0]


# ---------------------------------------------------------------------------------------------
# `dli eval`: ground-truth pixels per class are the masks' own counts.


@pytest.mark.slow
def test_eval_ground_truth_per_class_equals_the_index_masks(tmp_path: Path) -> None:
    root = write_index_dataset(tmp_path / "data", images=16, free=2, seed=7)
    run = tmp_path / "run"
    argv = ["train", "--data", str(root), "--epochs", "1", "--max-steps", "1", "--batch-size", "4"]
    argv += ["--image-size", "32", "--resize", "nearest", "--no-pretrained", "--device", "cpu"]
    argv += ["--num-threads", "1", "--out", str(run), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
        out = tmp_path / "eval.csv"
        assert main(["eval", "--checkpoint", str(run / "last.pt"), "--split", "all", "--out", str(out)]) == 0
    rows = {r["class"]: r for r in csv.DictReader(out.open())}
    masks = [np.asarray(Image.open(p)) for p in sorted((root / "masks").iterdir())]
    for c, name in enumerate(CLASSES):
        expected = sum(int(np.count_nonzero(m == c + 1)) for m in masks)
        assert int(rows[name]["tp"]) + int(rows[name]["fn"]) == expected


def test_preview_shows_injections_into_data_without_free_images(tmp_path: Path, capsys) -> None:
    root = write_index_dataset(tmp_path / "data", images=8, free=0, seed=5)
    out = tmp_path / "preview.png"
    argv = ["preview", "--data", str(root), "--out", str(out), "--batches", "1", "--batch-size", "4"]
    assert main([*argv, "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    injected = int(printed.split(",")[-1].split()[0])
    assert injected > 0 and out.is_file()


def test_donors_are_whole_single_class_masks_and_instances_of_several_class_images(index_data: Path) -> None:
    manifest = read_dataset(index_data)
    report = validate(manifest)
    instances = dict(zip(manifest.samples, report.instances, strict=True))
    auto = DonorTable.from_instances(manifest, instances)
    for k, instance in enumerate(auto.instances):
        sample = manifest.samples[auto.sample[k]]
        assert (instance is None) == (len(sample.classes) == 1)
        if instance is None:  # the whole mask, boxed as validation boxed it
            np.testing.assert_array_equal(auto.boxes[k], report.mask_boxes[auto.sample[k]])
            assert auto.mask_png(k) is None
    every = DonorTable.from_instances(manifest, instances, unit="instance")
    assert all(i is not None for i in every.instances) and len(every) >= len(auto)
    for k, instance in enumerate(every.instances):
        mask = np.asarray(Image.open(manifest.samples[every.sample[k]].mask))
        own = instance.full_mask() > 0
        assert (mask[own] == instance.class_id + 1).all()  # one class, its own pixels
        decoded = np.asarray(Image.open(__import__("io").BytesIO(every.mask_png(k).tobytes())))
        np.testing.assert_array_equal(decoded > 0, own)
    assert list(every.class_id) == sorted(every.class_id)
