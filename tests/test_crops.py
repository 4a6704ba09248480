"""Training on native-resolution crops (`--crop`): where crops lie, the loader's batches, bad input (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from dli.cli import main
from dli.common.errors import DliError
from dli.pipeline.crops import CropConfig, CropSampler, check_crop_fits


def test_defect_crops_contain_the_box_and_uniform_crops_stay_inside():
    sizes = np.array([[400, 600], [40, 50], [400, 600]])
    boxes = np.array([[0.5, 0.5, 0.55, 0.6], [np.nan] * 4, [0.1, 0.1, 0.9, 0.9]])
    sampler = CropSampler(CropConfig(64), sizes, boxes)
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left = sampler.corner(0, rng, with_defect=True)
        assert top <= 200 and top + 64 >= 220 and left <= 300 and left + 64 >= 360
        top, left = sampler.corner(0, rng, with_defect=False)
        assert 0 <= top <= 336 and 0 <= left <= 536 and top == int(top)
        assert sampler.corner(1, rng, with_defect=True) == (0.0, 0.0)  # smaller than the crop: not moved
        top, left = sampler.corner(2, rng, with_defect=True)  # a box larger than the crop: inside it
        assert 40 <= top <= 360 - 64 and 60 <= left <= 540 - 64
    box = sampler.box_in_crop(0, (190.0, 290.0))
    assert np.allclose(box, [10 / 64, 10 / 64, 30 / 64, 70 / 64])
    assert np.allclose(sampler.matrix((190.0, 290.0)), [[1, 0, -290], [0, 1, -190]])


def test_scale_applies_before_the_crop():
    sampler = CropSampler(CropConfig(64, scale=0.5), np.array([[400, 600]]), None)
    assert np.allclose(sampler.matrix((10.0, 20.0)), [[0.5, 0, -20], [0, 0.5, -10]])
    top, left = sampler.corner(0, np.random.default_rng(0), with_defect=False)
    assert top <= 200 - 64 and left <= 300 - 64


def test_a_crop_larger_than_every_image_is_refused():
    check_crop_fits(CropConfig(64), np.array([[50, 70], [30, 30]]), "data")  # one side fits: padded
    with pytest.raises(DliError, match=r"--crop 128: larger than every training image of data"):
        check_crop_fits(CropConfig(128), np.array([[50, 70], [30, 30]]), "data")
    with pytest.raises(DliError, match=r"at --scale 0.5"):
        check_crop_fits(CropConfig(64, scale=0.5), np.array([[100, 120]]), "data")


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
    from dli.data.synth import generate

    root = tmp_path_factory.mktemp("crops") / "synth"
    generate(root, images=24, seed=2, size_range=((150, 260), (200, 400)))
    return root


def test_loader_cuts_crops_at_native_resolution_and_injects_into_them(native_data):
    from dli.pipeline.loader import build_loader
    from dli.pipeline.planner import DliConfig
    from dli.training.datasets import load_datasets

    data = load_datasets(str(native_data), "stratified")
    loader = build_loader(
        data.train,
        batch_size=8,
        train=True,
        dli=DliConfig(poisson_prob=0.0),
        donors=data.donors(),
        source_boxes=data.source_boxes(),
        crop=CropConfig(64, defect_prob=1.0),
        num_threads=1,
    )
    try:
        batch = next(iter(loader))
        assert batch.images.shape == (8, 3, 64, 64) and batch.masks.shape == (8, 5, 64, 64)
        plan = batch.plan
        before = np.asarray(plan.class_ids_before)
        labelled = (batch.masks.sum(dim=(2, 3)) > 0).numpy()
        boxes = data.source_boxes()[list(plan.batch_indices)]
        # Every defect image whose defect fits in a crop shows it (defect probability 1).
        for n, class_id in enumerate(before):
            if class_id >= 0 and not np.isnan(boxes[n]).any():
                assert labelled[n, class_id]
        assert plan.injections  # donors' crops hold their defect, which lands in the canvas crop
        assert all(labelled[i.slot, i.class_id] for i in plan.injections)
        replayed = loader.replay(plan)
        assert np.array_equal(replayed.masks.numpy(), batch.masks.numpy())
    finally:
        loader.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--crop", "2048"], "--crop 2048: larger than every training image"),
        (["--crop", "60"], "--crop 60: must be a multiple of 8"),
        (["--scale", "0.5"], "--scale 0.5: applies to training on crops"),
        (["--crop", "64", "--crop-defect-prob", "1.5"], "--crop-defect-prob 1.5: must be in [0, 1]"),
        (["--crop", "64", "--image-size", "128"], "--image-size 128: with --crop 64"),
    ],
)
def test_bad_crop_flags_are_one_line_errors(native_data, tmp_path, capsys, flags, message):
    argv = [
        "train",
        "--data",
        str(native_data),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--no-pretrained",
        *flags,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.slow
def test_training_on_crops_validates_by_tiles_and_the_checkpoint_carries_the_tiling(native_data, tmp_path):
    from dli.models.checkpoint import load_checkpoint
    from dli.pipeline.tiling import Tiling
    from dli.training.config import TrainConfig
    from dli.training.trainer import train

    config = TrainConfig(
        data=str(native_data),
        out=str(tmp_path / "run"),
        crop=64,
        epochs=1,
        max_steps=2,
        batch_size=4,
        pretrained=False,
        progress=False,
        num_threads=1,
    )
    run = train(config).run_dir
    document = load_checkpoint(run / "best.pt")
    assert document["model_info"]["tiling"] == Tiling(64).to_dict()
    assert document["config"]["crop"] == 64 and document["config"]["crop_defect_prob"] == 0.5
    assert (run / "val_predictions.png").stat().st_size > 0


def test_preview_shows_crops_with_their_injections(native_data, tmp_path):
    from PIL import Image

    from dli.pipeline.preview import preview

    out = tmp_path / "preview.png"
    plans = preview(native_data, out, batches=1, batch_size=4, crop=64, crop_defect_prob=1.0)
    assert plans[0].injections
    with Image.open(out) as picture:
        assert picture.size[0] > 0


def test_image_sizes_are_those_dali_decodes_after_the_exif_orientation(tmp_path) -> None:
    from PIL import Image

    from dli.pipeline.crops import image_sizes

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 40 x 30 (W x H) file decodes as 30 x 40
    Image.new("L", (40, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("L", (40, 30)).save(tmp_path / "plain.jpg")
    assert image_sizes([tmp_path / "rotated.jpg", tmp_path / "plain.jpg"]).tolist() == [[40, 30], [30, 40]]
