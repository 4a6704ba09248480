"""The environment of a GPU check: package versions, CUDA majors, GPUs and driver, and what is wrong.

`probe_environment()` runs in a child process of `dli.bench.gpu_check` (`--probe`), so a package
whose import crashes cannot take the check down; it never raises for a missing or broken package.
`environment_warnings` names what would make the GPU path fail or mislead (CUDA majors that
differ between torch, CuPy and DALI, several wheels of one kind, a driver older than the builds,
a package that is installed but fails to import); `available` lists what the steps may use.

Only the standard library is imported at module level, like the check itself.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

PACKAGES: dict[str, str] = {
    "torch": "torch",
    "cupy": "cupy",
    "dali": "nvidia.dali",
    "smp": "segmentation_models_pytorch",
    "timm": "timm",
    "numpy": "numpy",
    "scipy": "scipy",
    "opencv": "cv2",
    "pytest": "pytest",
    "torchvision": "torchvision",
    "yaml": "yaml",
    "pillow": "PIL",
    "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
}
"""Short name -> module of every package the steps use."""
_CUDA_DISTRIBUTION = re.compile(r"^(cupy-cuda|nvidia-dali-cuda)(\d+?)(x|0)$")


def probe_environment() -> dict[str, Any]:
    """Versions, CUDA majors and GPUs of this Python; never raises for a missing or broken package."""
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {},
        "distributions": _cuda_distributions(),
        "cuda_majors": {},
        "gpus": [],
        "driver": None,
    }
    modules: dict[str, Any] = {}
    spec = importlib.util.find_spec("dli")
    found["dli"] = None if spec is None else spec.origin  # which checkout or install runs
    for name, module_name in PACKAGES.items():
        try:
            module = __import__(module_name, fromlist=["__version__"])
        except Exception as error:  # absent, or present and failing to load (PermissionError, ...)
            found["packages"][name] = {"version": None, "error": f"{type(error).__name__}: {error}"}
            continue
        modules[name] = module
        found["packages"][name] = {"version": str(getattr(module, "__version__", "?")), "error": None}
    majors = found["cuda_majors"]
    for distribution in found["distributions"]:
        majors[distribution] = int(_CUDA_DISTRIBUTION.match(distribution).group(2))  # type: ignore[union-attr]
    torch = modules.get("torch")
    if torch is not None and torch.version.cuda:
        majors["torch"] = int(torch.version.cuda.split(".")[0])
        found["torch_cuda"] = torch.version.cuda
    if "cupy" in modules:
        found |= _cupy_versions(modules["cupy"])
        if found.get("nvrtc"):
            majors["nvrtc"] = found["nvrtc"][0]
    if torch is not None:
        found["gpus"] = _torch_gpus(torch)
    found["driver"] = _driver_version()
    found["warnings"] = environment_warnings(found)
    return found


def _cuda_distributions() -> dict[str, str]:
    """Installed CuPy and DALI wheels built for one CUDA major (name -> version)."""
    from importlib import metadata

    wheels = {}
    for distribution in metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if _CUDA_DISTRIBUTION.match(name):
            wheels[name] = distribution.version
    return wheels


def _cupy_versions(cupy: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        from cupy_backends.cuda.libs import nvrtc

        found["nvrtc"] = list(nvrtc.getVersion())
    except Exception as error:
        found["nvrtc_error"] = f"{type(error).__name__}: {error}"
    for key, call in (("cupy_runtime", "runtimeGetVersion"), ("driver_cuda", "driverGetVersion")):
        try:
            found[key] = int(getattr(cupy.cuda.runtime, call)())
        except Exception as error:  # no GPU or no driver: reported, not fatal
            found[f"{key}_error"] = f"{type(error).__name__}: {error}"
    return found


def _torch_gpus(torch: Any) -> list[dict[str, Any]]:
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = []
        for index in range(count):
            properties = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": properties.name,
                    "capability": f"{properties.major}.{properties.minor}",
                    "memory_gib": round(properties.total_memory / 2**30, 1),
                    "multiprocessors": properties.multi_processor_count,
                }
            )
        return gpus
    except Exception:  # a broken CUDA install: no GPU usable
        return []


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def environment_warnings(found: Mapping[str, Any]) -> list[str]:
    """What is wrong with an environment: mixed CUDA majors, a driver older than the builds, ..."""
    warnings = []
    majors = found.get("cuda_majors", {})
    if len(set(majors.values())) > 1:
        listed = ", ".join(f"{name} {major}" for name, major in sorted(majors.items()))
        warnings.append(
            f"CUDA MAJORS MIX: {listed}. Keep one CUDA major per environment: DALI and CuPy must match "
            "torch's CUDA build ('dli[cuda12]' beside a CUDA 12 torch, 'dli[cuda13]' beside a CUDA 13 one)"
        )
    cupy_wheels = [name for name in found.get("distributions", {}) if name.startswith("cupy-")]
    dali_wheels = [name for name in found.get("distributions", {}) if name.startswith("nvidia-dali-")]
    for kind, wheels in (("CuPy", cupy_wheels), ("DALI", dali_wheels)):
        if len(wheels) > 1:
            warnings.append(f"SEVERAL {kind} WHEELS INSTALLED: {', '.join(wheels)}; keep one")
    driver_cuda, torch_major = found.get("driver_cuda"), majors.get("torch")
    if driver_cuda and torch_major and driver_cuda // 1000 < torch_major:
        warnings.append(
            f"THE DRIVER SUPPORTS CUDA {driver_cuda // 1000}.{driver_cuda % 1000 // 10}, "
            f"OLDER THAN torch's CUDA {torch_major}"
        )
    for name, package in found.get("packages", {}).items():
        error = package.get("error") or ""
        if error and not error.startswith(("ModuleNotFoundError", "ImportError")):
            warnings.append(f"{name} is installed but fails to import: {error}")
    return warnings


def available(found: Mapping[str, Any]) -> set[str]:
    """The REQUIRES names this environment offers ("gpu": torch sees a CUDA GPU)."""
    have = {name for name, package in found.get("packages", {}).items() if package.get("version")}
    if found.get("gpus"):
        have.add("gpu")
    return have
