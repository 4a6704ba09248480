"""Mask semantics: defect = value > 0 in the mask's own bit depth, on every path that reads masks.

The same label shape, stored as 8-bit 0/255, 8-bit 0/1, 16-bit 0/1, 16-bit 0/65535, 1-bit,
palette, RGB, RGBA and gray+alpha PNGs, must give the same labels through PIL (`read_mask`,
validation's defect fractions, class pixel counts) and through DALI (the decode pipeline, the
training loader and the evaluation loader, which `dli eval` uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.data.imageio import read_mask
from dli.data.manifest import Manifest, Sample
from dli.data.validation import validate
from dli.models.losses import count_class_pixels
from dli.pipeline.dali import DecodePipeline, Work
from dli.pipeline.loader import build_loader

SIZE = 64


def label_shape() -> np.ndarray:
    shape = np.zeros((SIZE, SIZE), dtype=bool)
    shape[10:30, 20:50] = True
    shape[40:44, 5:60] = True
    return shape


def palette_mask(shape: np.ndarray) -> Image.Image:
    image = Image.fromarray(shape.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 1, 0, 0] + [0] * (256 * 3 - 6))  # index 1: a barely red colour
    return image


def colour_mask(shape: np.ndarray, colour: tuple[int, ...]) -> Image.Image:
    pixels = np.zeros((*shape.shape, len(colour)), dtype=np.uint8)
    if len(colour) in (2, 4):
        pixels[..., -1] = 255  # opaque background: alpha never counts
    pixels[shape] = colour
    return Image.fromarray(pixels)


MASK_KINDS = {
    "8-bit 0/255": lambda s: Image.fromarray(s.astype(np.uint8) * 255),
    "8-bit 0/1": lambda s: Image.fromarray(s.astype(np.uint8)),
    "16-bit 0/1": lambda s: Image.fromarray(s.astype(np.uint16)),
    "16-bit 0/65535": lambda s: Image.fromarray(s.astype(np.uint16) * 65535),
    "1-bit": lambda s: Image.fromarray(s).convert("1"),
    "palette": palette_mask,
    "RGB": lambda s: colour_mask(s, (0, 0, 1)),
    "RGBA": lambda s: colour_mask(s, (0, 1, 0, 255)),
    "gray+alpha": lambda s: colour_mask(s, (1, 255)),
}


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(image, mask) per mask kind; the image is bright exactly where the label is."""
    folder = tmp_path_factory.mktemp("masks")
    shape = label_shape()
    files = {}
    for k, (kind, make) in enumerate(MASK_KINDS.items()):
        image, mask = folder / f"{k}.jpg", folder / f"{k}.png"
        Image.fromarray(np.where(shape, 220, 20).astype(np.uint8)).save(image, quality=98)
        make(shape).save(mask)
        files[kind] = (image, mask)
    return files


def test_the_fixture_stores_each_kind_in_its_own_format(mask_files: dict[str, tuple[Path, Path]]) -> None:
    modes = {}
    for kind, (_, mask) in mask_files.items():
        with Image.open(mask) as image:
            modes[kind] = image.mode
    assert modes == {
        "8-bit 0/255": "L", "8-bit 0/1": "L", "16-bit 0/1": "I;16", "16-bit 0/65535": "I;16",
        "1-bit": "1", "palette": "P", "RGB": "RGB", "RGBA": "RGBA", "gray+alpha": "LA",
    }  # fmt: skip


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_pil_reads_every_kind_as_the_same_labels(mask_files: dict[str, tuple[Path, Path]], kind: str) -> None:
    np.testing.assert_array_equal(read_mask(mask_files[kind][1]), label_shape())


def manifest_of(mask_files: dict[str, tuple[Path, Path]], root: Path) -> Manifest:
    samples = tuple(Sample(image, mask, 0) for image, mask in mask_files.values())
    return Manifest(samples, ("defect",), root)


def test_validation_and_class_pixels_see_every_kind_alike(
    mask_files: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    manifest = manifest_of(mask_files, tmp_path)
    report = validate(manifest)
    assert report.ok and not report.warnings  # no "empty mask" for any kind
    np.testing.assert_array_equal(report.mask_fractions, np.full(len(MASK_KINDS), label_shape().mean()))
    counts = count_class_pixels(manifest, SIZE)  # read again, without the validated fractions
    assert counts.positive == (pytest.approx(len(MASK_KINDS) * label_shape().sum()),)
    measured = dict(zip(manifest.samples, report.mask_fractions.tolist(), strict=True))
    assert counts == count_class_pixels(manifest, SIZE, fractions=measured)


@pytest.mark.parametrize("warp", [False, True])
def test_dali_decodes_every_kind_as_the_same_labels(
    mask_files: dict[str, tuple[Path, Path]], warp: bool
) -> None:
    images = tuple(str(image) for image, _ in mask_files.values())
    masks = tuple(str(mask) for _, mask in mask_files.values())
    identity = np.tile(np.eye(2, 3, dtype=np.float32), (len(images), 1, 1)) if warp else None
    pipeline = DecodePipeline((SIZE, SIZE), max_batch_size=len(images), warp=warp, device_id=None)
    pipeline.submit(Work(0, images, masks, identity))
    _, decoded = pipeline.fetch()
    for kind, mask in zip(mask_files, decoded.masks, strict=True):
        labels = np.asarray(mask)[..., 0]
        assert set(np.unique(labels)) <= {0.0, 1.0}, kind
        np.testing.assert_array_equal(labels == 1, label_shape(), err_msg=kind)


@pytest.mark.parametrize("train", [False, True])
def test_training_and_evaluation_batches_label_every_kind_alike(
    mask_files: dict[str, tuple[Path, Path]], tmp_path: Path, train: bool
) -> None:
    manifest = manifest_of(mask_files, tmp_path)
    loader = build_loader(manifest, batch_size=len(manifest), image_size=SIZE, train=train, seed=1)
    try:
        (batch,) = list(loader)
    finally:
        loader.close()
    order = [manifest.samples[i].image for i in loader.batch_indices()[0]] if train else None
    for n in range(len(manifest)):
        labels = batch.masks[n, 0].numpy() == 1
        # Training flips at random: the labels must cover the (equally flipped) bright pixels.
        bright = batch.images[n, 0].numpy() > 0
        kind = list(mask_files)[n] if order is None else f"sample {order[n].name}"
        assert labels.sum() == label_shape().sum(), kind
        np.testing.assert_array_equal(labels, bright, err_msg=kind)


@pytest.mark.gpu
def test_gpu_pipeline_decodes_every_kind_as_the_same_labels(mask_files: dict[str, tuple[Path, Path]]) -> None:
    images = tuple(str(image) for image, _ in mask_files.values())
    masks = tuple(str(mask) for _, mask in mask_files.values())
    pipeline = DecodePipeline((SIZE, SIZE), max_batch_size=len(images), warp=False, device_id=0)
    pipeline.submit(Work(0, images, masks, None))
    _, decoded = pipeline.fetch()
    for kind, mask in zip(mask_files, decoded.masks.as_cpu(), strict=True):
        np.testing.assert_array_equal(np.asarray(mask)[..., 0] == 1, label_shape(), err_msg=kind)
