"""Where a run computes and at what precision, and what it runs on.

`resolve_device(name, rank)` turns `--device` (auto, cpu, cuda, cuda:N) into a `torch.device`,
one GPU per process under several processes, with `DliError` for a GPU that is not there;
`amp_dtype_for` picks the autocast dtype (bf16 where the GPU supports it, fp16 otherwise, None =
fp32 on CPU or with `--no-amp`); `seed_everything` seeds every global RNG a run draws from;
`versions` and `device_description` are what `config.yaml` records about the machine.
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from dli.common.errors import DliError
from dli.training.config import DEVICE_PATTERN


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` -> `cuda:<rank>` when a GPU is present, else `cpu`; `DliError` for an absent GPU."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise DliError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DliError(f"--device {name}: no CUDA GPU is available")
        index = device.index if device.index is not None else rank
        if index >= torch.cuda.device_count():
            raise DliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that support it, else fp16; None (fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), NumPy's global RNG and Python's `random`."""
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - libraries may draw from the global RNG
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import timm

    import dli

    versions = {"dli": dli.__version__, "python": platform.python_version(), "torch": str(torch.__version__)}
    versions |= {"segmentation_models_pytorch": smp.__version__, "timm": timm.__version__}
    try:
        import nvidia.dali as dali

        versions["nvidia-dali"] = str(dali.__version__)
    except ImportError:
        pass
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"
