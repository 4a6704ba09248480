"""The data path on a GPU: nvJPEG decoding, CuPy injection kernels, outputs on the device, CPU agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.data.manifest import Manifest
from dli.data.synth import generate
from dli.pipeline.loader import MT_MEAN, MT_STD, build_loader
from dli.pipeline.planner import DliConfig

pytestmark = pytest.mark.gpu
pytest.importorskip("nvidia.dali", reason="the data path needs NVIDIA DALI")

SIZE = 96
# nvJPEG and libjpeg-turbo may round IDCT and upsampling differently: a few levels of 255 at most.
JPEG_TOLERANCE = 6 / 255 / MT_STD  # in normalized units


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("gpu") / "synth", images=48, seed=11, size_range=((80, 140), (80, 160))
    )


def loaders(manifest: Manifest, **kwargs: object) -> tuple[list, list]:
    options: dict[str, object] = {"batch_size": 8, "image_size": SIZE, "train": True, "seed": 3}
    options.update(kwargs)
    cpu = list(build_loader(manifest, device="cpu", **options))  # type: ignore[arg-type]
    gpu = list(build_loader(manifest, device="cuda", **options))  # type: ignore[arg-type]
    return cpu, gpu


def test_gpu_batches_live_on_the_device_and_agree_with_the_cpu(synthetic: Manifest) -> None:
    cpu, gpu = loaders(synthetic, dli=DliConfig(poisson_prob=0.5))
    assert len(cpu) == len(gpu) == len(synthetic) // 8
    methods = set()
    for c, g in zip(cpu, gpu, strict=True):
        assert (
            g.images.device.type == "cuda"
            and g.masks.device.type == "cuda"
            and g.class_ids.device.type == "cuda"
        )
        assert g.images.shape == c.images.shape and g.images.dtype == torch.float32
        assert c.plan.to_dict() == g.plan.to_dict(), "plans are drawn on the host: identical on both paths"
        torch.testing.assert_close(g.class_ids.cpu(), c.class_ids, rtol=0, atol=0)
        g_images, g_masks = g.images.cpu(), g.masks.cpu()
        # Masks: PNG decoding and nearest-neighbour warps agree up to edge pixels.
        assert (g_masks != c.masks).float().mean() < 0.002
        difference = (g_images - c.images).abs()
        assert (
            difference.mean() < JPEG_TOLERANCE / 4
            and torch.quantile(difference.flatten(), 0.999) < JPEG_TOLERANCE
        )
        for item in c.plan.injections:
            methods.add(item.method)
            label = c.masks[item.slot, item.class_id].bool().numpy()
            region = (
                ndimage.binary_dilation(label, np.ones((5, 5), bool)) if item.method == "poisson" else label
            )
            inside = torch.from_numpy(region)
            # The injected region agrees like the rest of the image does.
            assert difference[item.slot, 0][inside].mean() < JPEG_TOLERANCE / 2, item.to_dict()
        pixels = g.images * MT_STD + MT_MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert methods == {"poisson", "paste"}


def test_gpu_evaluation_batches(synthetic: Manifest) -> None:
    cpu, gpu = loaders(synthetic, train=False)
    assert [len(b) for b in gpu] == [8] * 6
    for c, g in zip(cpu, gpu, strict=True):
        assert g.plan is None and g.images.is_cuda
        assert (g.masks.cpu() != c.masks).float().mean() < 0.002
        assert (g.images.cpu() - c.images).abs().mean() < JPEG_TOLERANCE / 4


def test_gpu_loader_is_reproducible(synthetic: Manifest) -> None:
    first = list(
        build_loader(synthetic, batch_size=8, image_size=SIZE, train=True, dli=DliConfig(), device="cuda")
    )
    second = list(
        build_loader(synthetic, batch_size=8, image_size=SIZE, train=True, dli=DliConfig(), device="cuda")
    )
    for a, b in zip(first, second, strict=True):
        assert a.plan.to_dict() == b.plan.to_dict()
        torch.testing.assert_close(a.masks, b.masks, rtol=0, atol=0)
        # GPU reductions may add in another order: Poisson results agree to the solver's tolerance.
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def colour(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    from dli.data.manifest import read_dataset
    from dli.data.synth_formats import SynthOptions, generate_formatted

    root = tmp_path_factory.mktemp("gpu-rgb") / "synth"
    generate_formatted(
        root, images=32, seed=5, size_range=((80, 140), (80, 160)), options=SynthOptions(rgb=True)
    )
    return read_dataset(root)


@pytest.mark.parametrize("channels", [3, 1])
def test_gpu_colour_batches_agree_with_the_cpu(colour: Manifest, channels: int) -> None:
    """RGB (nvJPEG colour, per-channel normalization, 3-channel injection) and the luma of colour
    files agree with the CPU pipeline as gray batches do."""
    mean, std = ((0.45, 0.5, 0.55), (0.2, 0.22, 0.25)) if channels == 3 else ((0.5,), (0.2,))
    cpu, gpu = loaders(colour, dli=DliConfig(poisson_prob=0.5), channels=channels, mean=mean, std=std)
    tolerance = 6 / 255 / min(std)
    assert cpu and len(cpu) == len(gpu)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.images.is_cuda and g.images.shape == c.images.shape == (8, 3, SIZE, SIZE)
        difference = (g.images.cpu() - c.images).abs()
        assert difference.mean() < tolerance / 4 and torch.quantile(difference.flatten(), 0.999) < tolerance
        if channels == 1:
            assert torch.equal(g.images[:, 0], g.images[:, 1]) and torch.equal(g.images[:, 0], g.images[:, 2])
        else:
            red = g.images[:, 0] * std[0] + mean[0]
            green = g.images[:, 1] * std[1] + mean[1]
            assert (red - green).abs().mean() > 0.005  # the tint survives
