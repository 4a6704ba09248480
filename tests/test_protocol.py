"""`--protocol reference|dli`: each reference choice against a direct computation, and the protocol's
record, resume and refusal (CPU, 64 px synthetic data; the weights also on the real published split)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.data.synth import generate
from dli.models.losses import (
    ClassPixelCounts,
    LossOptions,
    build_loss,
    count_stored_defect_pixels,
)
from dli.models.metrics import ImageClassCounter
from dli.models.unet import build_model, count_parameters
from dli.training.config import PROTOCOL_DEFAULTS, TrainConfig
from dli.training.datasets import datasets_of
from dli.training.trainer import train

REFERENCE = LossOptions(**{k: PROTOCOL_DEFAULTS["reference"][k] for k in ("wce_weights", "balanced_counts")})
"""The reference protocol's weight rules (the other loss options left at their defaults)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=120, seed=5)
    return root


# ---------------------------------------------------------------------------------------------
# Weights, from the masks, by an independent NumPy computation.


def _numpy_reference_weights(pixels: np.ndarray, beta: float = 0.9999) -> tuple[np.ndarray, np.ndarray]:
    """The reference's formulas: WCE weights (1 - share) / (C - 1); class-balanced on that list."""
    share = pixels / pixels.sum()
    wce = (1.0 - share) / (len(pixels) - 1)
    effective = 1.0 - np.power(beta, wce)
    balanced = (1.0 - beta) / effective
    return wce, balanced / balanced.sum()


def _stored_pixels(root: Path, csv_name: str, threshold: int = 0) -> np.ndarray:
    pixels = np.zeros(5)
    with open(root / "splits" / "reference-seed42" / csv_name, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["defect_id"]) >= 0:
                mask = np.asarray(Image.open(root / row["mask_fpath"]).convert("L"))
                pixels[int(row["defect_id"])] += (mask > threshold).sum()
    return pixels


@pytest.mark.realdata
def test_reference_weights_on_the_published_split_follow_the_reference_formulas(mt_root, tmp_path):
    config = TrainConfig(data=str(mt_root), split="reference").validate().resolved()
    pixels = count_stored_defect_pixels(datasets_of(config).train)
    expected_wce, expected_balanced = _numpy_reference_weights(_stored_pixels(mt_root, "train_data.csv"))
    counts = ClassPixelCounts(tuple(pixels), 1.0)
    for method, expected in (("wce", expected_wce), ("balanced", expected_balanced)):
        _, spec = build_loss(method, counts, options=REFERENCE, stored_defect_pixels=pixels)
        np.testing.assert_allclose(spec.class_weights, expected, rtol=1e-6)
        assert sum(spec.class_weights) == pytest.approx(1.0, abs=1e-6)
    # The reference hard-codes its list: the same formula over all 392 defect masks (train and val)
    # binarised at > 127 gives it to its four decimals, which is where the list came from.
    published = [0.2490, 0.2294, 0.2483, 0.2005, 0.0729]
    every_mask = _stored_pixels(mt_root, "train_data.csv", 127) + _stored_pixels(mt_root, "val_data.csv", 127)
    np.testing.assert_array_equal(np.round(_numpy_reference_weights(every_mask)[0], 4), published)
    # The training split alone gives weights within 0.002 of it (the project never reads val masks).
    np.testing.assert_allclose(expected_wce, published, atol=2e-3)


def test_stored_pixels_count_masks_at_their_own_resolution(data, small):
    train_set = datasets_of(small(data, Path("unused")).validate().resolved()).train
    expected = np.zeros(train_set.num_classes)
    for sample in train_set.samples:
        if sample.class_id >= 0:
            expected[sample.class_id] += (np.asarray(Image.open(sample.mask).convert("L")) > 0).sum()
    np.testing.assert_array_equal(count_stored_defect_pixels(train_set), expected)


# ---------------------------------------------------------------------------------------------
# Loss terms, against direct formulas.


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 6, 6, generator=generator)
    targets = (torch.rand(3, 5, 6, 6, generator=generator) > 0.8).float()
    return logits, targets


def test_global_dice_by_hand():
    # Two classes, one pixel each: p = (0.5, 0.75), t = (1, 0): 2*0.5 / (1.25 + 1).
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    targets = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    loss, spec = build_loss("bce", options=LossOptions(dice="global"))
    bce = (math.log(2.0) + math.log(4.0)) / 2
    dice = 1.0 - (2 * 0.5 + 1e-8) / (1.25 + 1.0 + 1e-8)
    assert loss(logits, targets).item() == pytest.approx(0.5 * bce + 0.5 * dice, rel=1e-6)
    assert spec.dice == "global"
    # The per-class Dice of the same batch differs: class 1 has no positive pixel and counts 0.
    per_class, _ = build_loss("bce")
    assert per_class(logits, targets).item() == pytest.approx(0.5 * bce + 0.5 * (1 - 1 / 1.5) / 2, rel=1e-6)


def test_reference_focal_against_the_direct_formula():
    logits, targets = _batch(1)
    loss, _ = build_loss("focal", options=LossOptions(focal="per-class-mean", dice="global"))
    p = torch.sigmoid(logits.double())
    bce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    focal = sum(b * (1 - math.exp(-b)) ** 2 for b in (bce[:, c].mean().item() for c in range(5)))
    intersection, total = (p * targets).sum().item(), (p.sum() + targets.sum()).item()
    dice = 1 - (2 * intersection + 1e-8) / (total + 1e-8)
    assert loss(logits, targets).item() == pytest.approx(0.5 * focal + 0.5 * dice, rel=1e-5)


def test_reference_weighted_terms_sum_the_weighted_class_means():
    logits, targets = _batch(2)
    pixels = (10.0, 200.0, 30.0, 400.0, 5000.0)
    counts = ClassPixelCounts(pixels, 1e6)
    p = torch.sigmoid(logits.double())
    class_bce = [
        (-(targets[:, c] * torch.log(p[:, c]) + (1 - targets[:, c]) * torch.log(1 - p[:, c]))).mean().item()
        for c in range(5)
    ]
    wce, balanced = _numpy_reference_weights(np.array(pixels))
    for method, weights in (("wce", wce), ("balanced", balanced)):
        loss, spec = build_loss(method, counts, options=REFERENCE, stored_defect_pixels=pixels)
        loss.dice_weight = 0.0
        assert loss(logits, targets).item() == pytest.approx(
            0.5 * float(np.dot(weights, class_bce)), rel=1e-5
        )
        np.testing.assert_allclose(spec.class_weights, weights, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Model and data path.


def test_four_conv_decoder_parameter_count():
    two, _ = build_model("l-resnet18", 5, pretrained=False)
    four, _ = build_model("l-resnet18", 5, pretrained=False, decoder_convs=4)
    # Two more 3x3 conv (no bias) + BatchNorm (weight, bias) layers per block, at widths 128, 64, 32.
    extra = sum(2 * (9 * w * w + 2 * w) for w in (128, 64, 32))
    assert count_parameters(four).decoder - count_parameters(two).decoder == extra == 387_968
    assert count_parameters(four).encoder == count_parameters(two).encoder
    assert four(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_nearest_resize_samples_image_and_mask_at_the_same_pixels(tmp_path):
    from dli.pipeline.dali import DecodePipeline, Work

    # Each pixel's value encodes its position; the mask marks the pixels of one row band.
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    image = (rows * 16 + cols).astype(np.uint8)
    mask = np.where((rows % 4) == 1, 255, 0).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    work = Work(1, (str(tmp_path / "image.png"),), (str(tmp_path / "mask.png"),), None)

    outputs = {}
    for mode in ("nearest", "linear"):
        pipeline = DecodePipeline((8, 8), max_batch_size=1, warp=False, device_id=None, resize=mode)
        pipeline.submit(work)
        _, decoded = pipeline.fetch()
        outputs[mode] = (np.asarray(decoded.images[0])[..., 0] * 255.0, np.asarray(decoded.masks[0])[..., 0])
    values, labels = outputs["nearest"]
    np.testing.assert_allclose(values, np.round(values), atol=1e-3)  # no blending: stored values only
    picked = np.rint(values).astype(int)
    sampled_rows, sampled_cols = picked // 16, picked % 16
    assert np.all(np.diff(sampled_rows[:, 0]) == 2) and np.all(np.diff(sampled_cols[0]) == 2)
    np.testing.assert_array_equal(labels, (mask[sampled_rows, sampled_cols] > 0).astype(np.float32))
    linear_values, _ = outputs["linear"]
    assert not np.allclose(linear_values, np.round(linear_values), atol=1e-3)  # the other mode blends


def test_poisson_label_is_the_dilated_domain_when_asked():
    from dli.kernels.morphology import dilate
    from dli.pipeline.inject import inject
    from dli.pipeline.planner import DliConfig, Injection, Plan

    size = 16
    identity = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    source_mask = torch.zeros(1, size, size)
    source_mask[0, 6:9, 7:10] = 1.0
    labels = {}
    for rule in ("source", "dilated"):
        injection = Injection(0, 1, 5, "poisson", identity)
        plan = Plan((0,), (-1,), (1,), (injection,), np.stack([identity]), 2)
        images = torch.full((1, 1, size, size), 0.4)
        sources = torch.full((1, 1, size, size), 0.8)
        label = torch.zeros(1, 2, size, size)
        inject(
            images, label, sources, source_mask.clone(), plan, DliConfig(poisson_prob=1.0, poisson_label=rule)
        )
        labels[rule] = label
    torch.testing.assert_close(labels["source"][0, 1], source_mask[0])
    torch.testing.assert_close(labels["dilated"][0, 1], dilate(source_mask, 2)[0].float())
    assert labels["dilated"][0, 1].sum() > labels["source"][0, 1].sum()
    assert labels["dilated"][0, 0].sum() == 0


def test_image_class_grouping_counts_every_channel_of_the_class_images():
    counter = ImageClassCounter(("a", "b"))
    logits = torch.full((3, 2, 1, 2), -10.0)
    targets = torch.zeros(3, 2, 1, 2)
    targets[0, 0, 0, 0] = 1  # image 0 (class a): one defect pixel, predicted
    logits[0, 0, 0, 0] = 10.0
    logits[0, 1, 0, 1] = 10.0  # ... and a false positive in channel b, which counts against a
    targets[1, 1, 0, :] = 1  # image 1 (class b): two defect pixels, one found
    logits[1, 1, 0, 0] = 10.0
    logits[2, 0, 0, 0] = 10.0  # image 2 is defect-free (-1): left out
    counter.update_by_image(logits, targets, torch.tensor([0, 1, -1]))
    scores = counter.compute()
    assert scores.tp == (1, 1) and scores.fp == (1, 0) and scores.fn == (0, 1)
    assert scores.class_iou == pytest.approx((0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# Training: the schedule, the batches, the record, resume.


def test_reference_protocol_trains_with_its_settings_and_records_them(data, tmp_path, small):
    config = small(data, tmp_path / "run", protocol="reference", method="wce", data_fraction=0.5)
    images = len(datasets_of(config.validate().resolved()).train)
    batch = next(b for b in range(8, 16) if images % b)  # a batch size that leaves a partial last batch
    result = train(replace(config, batch_size=batch))
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["protocol"] == "reference"
    assert {k: saved[k] for k in PROTOCOL_DEFAULTS["reference"]} == PROTOCOL_DEFAULTS["reference"]
    runtime = saved["runtime"]
    assert runtime["steps_per_epoch"] == math.ceil(images / batch)  # the last, partial batch is kept
    assert runtime["precision"] == "float32" and runtime["parameters"]["decoder"] == 932_608
    weights = runtime["class_weights"]["weights"]
    assert list(weights) == runtime["class_names"] and sum(weights.values()) == pytest.approx(1.0)
    # Cosine annealing per epoch: epoch 1 at the initial rate, epoch 2 at half of it (T_max = 2).
    assert [r["lr"] for r in result.history] == pytest.approx([5e-4, 2.5e-4])
    assert "iou_by_image_class/uneven" in result.history[-1]
    # `dli eval` and `dli predict` rebuild the 4-conv model and resize as it was trained.
    from dli.models.checkpoint import model_from_checkpoint

    model, info = model_from_checkpoint(result.run_dir / "best.pt")
    assert count_parameters(model).decoder == 932_608 and (info.decoder_convs, info.resize) == (4, "nearest")


def test_dli_protocol_is_the_default_and_keeps_its_choices(data, tmp_path, small):
    result = train(small(data, tmp_path / "run", method="wce", epochs=1, max_steps=2, dice="global"))
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["protocol"] == "dli" and saved["dice"] == "global"  # one setting flipped
    others = {k: v for k, v in PROTOCOL_DEFAULTS["dli"].items() if k != "dice"}
    assert {k: saved[k] for k in others} == others
    assert saved["runtime"]["class_weights"]["rule"].startswith("pos_weight")
    assert [r["lr"] for r in result.history] != [5e-4]  # per-step cosine: lowered within the epoch


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_protocol_is_resumed_exactly_and_another_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--no-pretrained", "--no-progress"]
    args += ["--image-size", "64", "--batch-size", "8", "--num-threads", "1", "--epochs", "2"]
    assert main([*args, "--protocol", "reference", "--method", "bce", "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--protocol", "dli"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--protocol dli" in error and "reference" in error
    assert main([*args, "--resume", "--dice", "per-class"]) == 2  # a governed setting cannot change either
    assert "--dice per-class" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # resumes under the run's own protocol (nothing left to do)
    assert main([*args, "--resume", "--protocol", "reference"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["protocol"] == "reference" and saved["decoder_convs"] == 4


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_resume_under_the_reference_protocol_continues_the_run(data, tmp_path, small):
    common = {"protocol": "reference", "method": "dli", "epochs": 2, "data_fraction": 0.5}
    straight = train(small(data, tmp_path / "straight", **common))

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(small(data, tmp_path / "killed", **common), on_epoch_end=stop)
    resumed = train(small(data, tmp_path / "killed", resume=True, **common))
    timing = {"seconds", "images_per_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == strip


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--protocol", "paper"], "--protocol"),
        (["--dice", "mean"], "--dice"),
        (["--decoder-convs", "3"], "--decoder-convs"),
        (["--resize", "cubic"], "--resize"),
    ],
)
def test_bad_protocol_values_are_one_line_errors(capsys, flags, named):
    assert main(["train", *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dli train: error: argument") and named in line and "dli train --help" in line


# ---------------------------------------------------------------------------------------------
# `dli experiment`: a grid over protocols, and the summary's labels and the paper's statistics.


def test_a_grid_file_over_both_protocols_trains_each_run_under_its_protocol(tmp_path):
    from dli.experiments.grid import Grid, read_grid_file

    (tmp_path / "grid.yaml").write_text(
        "protocols: [reference, dli]\nmethods: [wce, dli]\nseeds: [0]\n"
        "train:\n  epochs: 1\n  dice: per-class\n"
    )
    runs = {
        r.name: r.config for r in Grid.from_document(read_grid_file(tmp_path / "grid.yaml")).runs(tmp_path)
    }
    assert set(runs) == {
        "reference__wce__l-resnet18__f1.0__s0",
        "reference__dli-p0.5-all-free__l-resnet18__f1.0__s0",
        "wce__l-resnet18__f1.0__s0",
        "dli-p0.5-all-free__l-resnet18__f1.0__s0",
    }
    reference = runs["reference__wce__l-resnet18__f1.0__s0"]
    assert (reference.protocol, reference.wce_weights, reference.decoder_convs) == (
        "reference",
        "pixel-share",
        4,
    )
    assert reference.dice == "per-class"  # a shared setting overrides the protocol's default
    assert runs["wce__l-resnet18__f1.0__s0"].protocol == "dli"
    (tmp_path / "bad.yaml").write_text("protocols: [paper]\n")
    with pytest.raises(DliError, match="paper: unknown protocol") as error:
        read_grid_file(tmp_path / "bad.yaml")
    assert "\n" not in str(error.value)


def test_experiment_flag_passes_the_protocol_to_every_run(tmp_path, capsys):
    assert (
        main(
            [
                "experiment",
                "--preset",
                "smoke",
                "--protocol",
                "reference",
                "--out",
                str(tmp_path),
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("reference__") == 4 and "4 runs" in out


def _run_folder(expdir: Path, name: str, iou: float, seed: int, protocol: str, grouped: bool) -> None:
    folder = expdir / name
    folder.mkdir(parents=True)
    classes = ("blowhole", "break")
    record = {"epoch": 1, "step": 5, "iou": iou, "f1": iou}
    record |= {f"iou/{c}": iou for c in classes} | {f"f1/{c}": iou for c in classes}
    if grouped:
        record |= {f"iou_by_image_class/{c}": iou / 2 for c in classes}
    config = TrainConfig(method="bce", protocol=protocol, seed=seed, epochs=1).to_dict()
    (folder / "config.yaml").write_text(yaml.safe_dump(config | {"runtime": {"class_names": list(classes)}}))
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")


def test_summary_labels_protocols_and_offers_the_papers_spread_and_grouping(tmp_path):
    from dli.experiments.report import aggregate

    for seed, iou in enumerate((0.50, 0.54, 0.58)):
        _run_folder(tmp_path, f"r{seed}", iou, seed, "reference", grouped=True)
    for seed, iou in enumerate((0.40, 0.44)):
        _run_folder(tmp_path, f"d{seed}", iou, seed, "dli", grouped=False)
    summary = aggregate(tmp_path)
    table = summary.table1()
    assert table.rows == ("bce [reference]", "bce [dli]") and "protocol in brackets" in table.title
    cell = table.cell("bce [reference]", "l-resnet18")
    assert cell.std == pytest.approx(0.04) and cell.population_std == pytest.approx(
        math.sqrt(2 * 0.04**2 / 3)
    )
    paper = summary.table1(population=True).cell("bce [reference]", "l-resnet18")
    assert paper.std == pytest.approx(math.sqrt(2 * 0.04**2 / 3)) and str(paper).startswith("54.00 ± 3.27")
    grouped = summary.per_class("l-resnet18", by_image_class=True)
    assert grouped.cell("blowhole", "bce [reference]").mean == pytest.approx(0.27)
    assert grouped.cell("blowhole", "bce [dli]") is None  # not recorded by those runs
    markdown = (tmp_path / "summary.md").read_text()
    assert "## As the paper computes them" in markdown and "bce [reference]" in markdown
    assert "Per-class IoU by image class" in markdown
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    overall = {r["protocol"]: r for r in rows if r["metric"] == "iou"}
    assert float(overall["reference"]["population_std"]) == pytest.approx(math.sqrt(2 * 0.04**2 / 3))
    assert float(overall["dli"]["std"]) == pytest.approx(math.sqrt(2) * 0.02)
    assert any(r["metric"] == "iou_by_image_class/break" for r in rows)
    # One protocol only: the titles name it and the rows stay bare.
    single = aggregate_one(tmp_path, "reference")
    assert single.table1().rows == ("bce",) and "protocol reference" in single.table1().title


def aggregate_one(expdir: Path, protocol: str):
    from dli.experiments.aggregate import Summary, read_runs

    return Summary([r for r in read_runs(expdir) if r.config.protocol == protocol])


def test_a_run_saved_before_protocols_existed_resumes_as_dli():
    from dli.training.run_folder import check_resumable

    current = TrainConfig(data="/data", epochs=3).validate().resolved()
    saved = {k: v for k, v in current.to_dict().items() if k not in PROTOCOL_DEFAULTS and k != "protocol"}
    check_resumable(current, saved, Path("last.pt"))  # the old run's settings are dli's: no error
    reference = TrainConfig(data="/data", epochs=3, protocol="reference").validate().resolved()
    with pytest.raises(DliError, match="--protocol reference") as error:
        check_resumable(reference, saved, Path("last.pt"))
    assert "\n" not in str(error.value)


def test_several_processes_refuse_to_keep_the_last_batch(capsys):
    args = ["train", "--devices", "2", "--device", "cpu", "--protocol", "reference"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--last-batch keep" in error and "--last-batch drop" in error
