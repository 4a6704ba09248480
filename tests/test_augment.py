"""Augmentation matrices: their convention, their samplers, and DALI applying them to images and masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.common.errors import DliError
from dli.pipeline.augment import (
    DEFAULT_DEFECT_AUGMENT,
    IDENTITY,
    MT_DEFECT_AUGMENT,
    AffineAugment,
    apply_affine_numpy,
    compose,
    defect_augments,
    flip_matrix,
    invert,
    random_flips,
    shift_scale_rotate_matrix,
)
from dli.pipeline.dali import DecodePipeline, Work

H, W = 48, 64


def l_shape(height: int, width: int, scale: int = 1) -> np.ndarray:
    """An asymmetric L: a tall bar and a short foot to its right (any flip or turn shows)."""
    mask = np.zeros((height, width), dtype=bool)
    top, left = 8 * scale, 12 * scale
    mask[top : top + 28 * scale, left : left + 6 * scale] = True
    mask[top + 22 * scale : top + 28 * scale, left : left + 20 * scale] = True
    return mask


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_matrices_follow_the_pixel_grid_convention() -> None:
    image = np.arange(H * W, dtype=np.int32).reshape(H, W)
    for horizontal, vertical, expected in [
        (True, False, image[:, ::-1]),
        (False, True, image[::-1]),
        (True, True, image[::-1, ::-1]),
    ]:
        matrix = flip_matrix((H, W), horizontal=horizontal, vertical=vertical)
        np.testing.assert_array_equal(apply_affine_numpy(image, matrix, nearest=True), expected)
        np.testing.assert_array_equal(
            apply_affine_numpy(image.astype(np.float32), matrix, nearest=False), expected
        )
    square = image[:, :H]
    quarter = shift_scale_rotate_matrix((H, H), angle=90.0, scale=1.0)
    np.testing.assert_array_equal(apply_affine_numpy(square, quarter, nearest=True), np.rot90(square))
    shift = shift_scale_rotate_matrix((H, W), angle=0.0, scale=1.0, shift=(3 / W, -2 / H))
    shifted = apply_affine_numpy(image, shift, nearest=True)
    np.testing.assert_array_equal(shifted[:-2, 3:], image[2:, :-3])
    matrix = compose(shift, shift_scale_rotate_matrix((H, W), angle=17.0, scale=1.05))
    np.testing.assert_allclose(compose(matrix, invert(matrix)), IDENTITY, atol=1e-5)


def test_samplers_respect_their_ranges() -> None:
    rng = np.random.default_rng(0)
    blowhole = MT_DEFECT_AUGMENT["blowhole"]
    matrices = [blowhole.sample(rng, (H, W)) for _ in range(2000)]
    identity = np.mean([np.allclose(m, IDENTITY) for m in matrices])
    assert abs(identity - 0.25) < 0.04  # no flip (1/2) and no shift-scale-rotate (1/2)
    centre = np.array([W / 2, H / 2, 1.0])
    for m in matrices:
        linear = m[:, :2].astype(np.float64)
        zoom = np.sqrt(abs(np.linalg.det(linear)))
        assert 0.9 - 1e-6 <= zoom <= 1.1 + 1e-6
        moved = m @ centre - centre[:2]  # flips and turns keep the centre; only the shift moves it
        assert abs(moved[0]) <= 0.0625 * W + 1e-3 and abs(moved[1]) <= 0.0625 * H + 1e-3
        # Flips only change signs of columns: |cos| and |sin| of the turn read off the first row.
        angle = np.degrees(np.arctan2(abs(linear[0, 1]), abs(linear[0, 0])))
        assert angle <= 10.0 + 1e-3
    crack = [MT_DEFECT_AUGMENT["crack"].sample(rng, (H, W)) for _ in range(500)]
    assert all(np.linalg.det(m[:, :2]) > 0 for m in crack)  # never mirrored
    flips = random_flips(rng, 4000, (H, W))
    assert abs(np.mean(flips[:, 0, 0] < 0) - 0.5) < 0.03 and abs(np.mean(flips[:, 1, 1] < 0) - 0.5) < 0.03
    assert abs(np.mean((flips[:, 0, 0] < 0) & (flips[:, 1, 1] < 0)) - 0.25) < 0.03


def test_class_table_and_validation() -> None:
    table = defect_augments(["Blowhole", "crack", "scratch"])
    assert table == (MT_DEFECT_AUGMENT["blowhole"], MT_DEFECT_AUGMENT["crack"], DEFAULT_DEFECT_AUGMENT)
    with pytest.raises(DliError, match="flip_p = 2"):
        AffineAugment(flip_p=2)
    with pytest.raises(DliError, match=r"scale = 1\.5"):
        AffineAugment(scale=1.5)


@pytest.fixture(scope="module")
def l_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("geometry")
    mask = l_shape(H, W)
    image = np.where(mask, 220, 40).astype(np.uint8)
    image[0, :] = 90  # a distinct top row, so border clamping is visible too
    return (
        write_png(folder / "l.png", image),
        write_png(folder / "l_mask.png", mask.astype(np.uint8) * 255),
        image,
        mask,
    )


GEOMETRIES = {
    "identity": IDENTITY,
    "hflip": flip_matrix((H, W), horizontal=True, vertical=False),
    "vflip": flip_matrix((H, W), horizontal=False, vertical=True),
    "both": flip_matrix((H, W), horizontal=True, vertical=True),
    "rotate": shift_scale_rotate_matrix((H, W), angle=9.0, scale=1.0),
    "scale-shift": shift_scale_rotate_matrix((H, W), angle=0.0, scale=1.1, shift=(0.06, -0.05)),
    "flip-rotate-scale-shift": compose(
        shift_scale_rotate_matrix((H, W), angle=-7.0, scale=0.92, shift=(-0.04, 0.06)),
        flip_matrix((H, W), horizontal=True, vertical=False),
    ),
}


def test_dali_warps_image_and_mask_alike_and_like_the_reference(
    l_files: tuple[Path, Path, np.ndarray, np.ndarray],
) -> None:
    image_path, mask_path, image, mask = l_files
    rng = np.random.default_rng(0)
    sampled = [MT_DEFECT_AUGMENT["blowhole"].sample(rng, (H, W)) for _ in range(5)]
    matrices = np.stack([*GEOMETRIES.values(), *sampled]).astype(np.float32)
    # mean 0, std 1/255: the pipeline hands back raw 0..255 intensities.
    pipeline = DecodePipeline((H, W), max_batch_size=len(matrices), warp=True, device_id=None, std=1 / 255)
    pipeline.submit(Work(1, (str(image_path),) * len(matrices), (str(mask_path),) * len(matrices), matrices))
    _, decoded = pipeline.fetch()
    names = [*GEOMETRIES, *(f"sampled-{i}" for i in range(len(sampled)))]
    for k, name in enumerate(names):
        warped = np.asarray(decoded.images[k])[..., 0]
        warped_mask = np.asarray(decoded.masks[k])[..., 0] > 0
        expected_mask = apply_affine_numpy(mask, matrices[k], nearest=True)
        expected = apply_affine_numpy(image.astype(np.float32), matrices[k], nearest=False)
        # Nearest-neighbour picks can differ only where a pixel centre maps onto a pixel edge.
        assert np.mean(warped_mask != expected_mask) < 0.002, name
        assert np.abs(warped - expected).max() < 0.05, name  # of 255: float rounding only
        # Image and mask stay aligned: the mask covers exactly the bright (L) pixels.
        bright = warped > 130
        if name in ("identity", "hflip", "vflip", "both"):
            np.testing.assert_array_equal(warped_mask, bright, err_msg=name)
            np.testing.assert_array_equal(warped, expected, err_msg=name)
        else:
            iou = (warped_mask & bright).sum() / (warped_mask | bright).sum()
            assert iou > 0.9, (name, iou)


def test_dali_resize_then_warp_keeps_alignment(tmp_path: Path) -> None:
    mask = l_shape(2 * H, 2 * W, scale=2)
    image = np.where(mask, 200, 30).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    (tmp_path / "l.jpg").write_bytes(buffer.getvalue())
    write_png(tmp_path / "l.png", mask.astype(np.uint8) * 255)
    matrices = np.stack([GEOMETRIES["identity"], GEOMETRIES["both"], GEOMETRIES["flip-rotate-scale-shift"]])
    pipeline = DecodePipeline((H, W), max_batch_size=3, warp=True, device_id=None, std=1 / 255)
    pipeline.submit(Work(7, (str(tmp_path / "l.jpg"),) * 3, (str(tmp_path / "l.png"),) * 3, matrices))
    work, decoded = pipeline.fetch()
    assert work.serial == 7
    small = l_shape(H, W)
    for k in range(3):
        warped_mask = np.asarray(decoded.masks[k])[..., 0] > 0
        bright = np.asarray(decoded.images[k])[..., 0] > 115
        iou = (warped_mask & bright).sum() / (warped_mask | bright).sum()
        assert iou > 0.9, (k, iou)
        expected = apply_affine_numpy(small, matrices[k], nearest=True)
        assert (warped_mask == expected).mean() > 0.98
