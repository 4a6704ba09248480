"""One reader semantics for training and prediction: bit depth, colour modes, EXIF orientation.

`dli.data.imageio.read_image` (validation, `dli predict`, ONNX predict) must give the pixels
DALI's decoder gives the training pipeline, for 8- and 16-bit gray, RGB and palette files, and
with an EXIF orientation; validation names a mask that fits only the unrotated image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.data.imageio import EXIF_ORIENTATION, LUMA, read_image, read_mask
from dli.data.manifest import read_dataset
from dli.data.validation import validate

RNG = np.random.default_rng(0)
RAW = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
RAW[:8, :16] = 255  # a corner that shows the orientation


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[EXIF_ORIENTATION] = orientation
    return tags


def write(folder: Path, name: str) -> Path:
    path = folder / name
    if name == "gray8.png":
        Image.fromarray(RAW[..., 0]).save(path)
    elif name == "gray16.png":
        Image.fromarray(
            RAW[..., 0].astype(np.uint16) * 257 + RNG.integers(0, 200, (40, 60), dtype=np.uint16)
        ).save(path)
    elif name == "rgb.png":
        Image.fromarray(RAW).save(path)
    elif name == "palette.png":
        Image.fromarray(RAW).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    elif name == "turned6.jpg":
        Image.fromarray(RAW[..., 1]).save(path, quality=95, exif=exif(6))
    elif name == "turned3.png":
        Image.fromarray(RAW[..., 2]).save(path, exif=exif(3))
    elif name == "turned8.png":
        Image.fromarray(RAW).save(path, exif=exif(8))
    return path


def dali_decode(path: Path, gray: bool) -> np.ndarray:
    """What the training pipeline's decoder (`fn.decoders.image` on the CPU) makes of `path`."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        data, _ = fn.readers.file(files=[str(path)])
        return fn.decoders.image(data, device="cpu", output_type=types.GRAY if gray else types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    return np.asarray(out.at(0))


@pytest.mark.parametrize(
    "name", ["gray8.png", "gray16.png", "rgb.png", "palette.png", "turned6.jpg", "turned3.png", "turned8.png"]
)
def test_predict_reads_an_image_as_training_decodes_it(tmp_path, name):
    path = write(tmp_path, name)
    stored_gray = Image.open(path).mode in ("1", "L")
    rgb = dali_decode(path, gray=False)
    assert np.array_equal(read_image(path, 3), rgb)
    one = read_image(path, 1)
    if stored_gray:
        assert np.array_equal(one, dali_decode(path, gray=True))
    else:  # the pipeline's luma of the decoded RGB
        expected = rgb.astype(np.float32) @ np.asarray(LUMA, np.float32)
        np.testing.assert_allclose(one[..., 0], expected, atol=1e-3)
    assert one.shape[:2] == rgb.shape[:2]
    if name.startswith("turned6") or name.startswith("turned8"):
        assert one.shape[:2] == (60, 40)


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16)).save(path)
    assert read_image(path, 1)[..., 0].tolist() == [[0, 1, 128, 255]]


def make_dataset(root: Path, mask_size: tuple[int, int]) -> Path:
    """A folder dataset with one crack image tagged EXIF orientation 6 (stored 60 wide, 40 high)."""
    images = root / "MT_Crack" / "Imgs"
    images.mkdir(parents=True)
    Image.fromarray(RAW[..., 0]).save(images / "a.jpg", quality=95, exif=exif(6))
    mask = np.zeros(mask_size, np.uint8)
    mask[: mask_size[0] // 2, : mask_size[1] // 3] = 255
    Image.fromarray(mask).save(images / "a.png")
    return root


def test_a_mask_that_fits_only_the_unrotated_image_is_named(tmp_path):
    report = validate(read_dataset(make_dataset(tmp_path / "d", (40, 60))), raise_errors=False)
    (problem,) = report.errors
    assert problem.path.name == "a.png" and problem.kind == "mask fits the unrotated image"
    assert "EXIF orientation 6" in problem.line()


def test_a_mask_that_fits_the_oriented_image_is_accepted(tmp_path):
    root = make_dataset(tmp_path / "d", (60, 40))
    report = validate(read_dataset(root), raise_errors=False)
    assert not report.errors
    mask_path = root / "MT_Crack" / "Imgs" / "a.png"
    assert read_mask(mask_path).shape == read_image(root / "MT_Crack" / "Imgs" / "a.jpg", 1).shape[:2]
