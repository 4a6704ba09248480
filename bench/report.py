"""What `dli bench` records besides its figures, and the table it prints.

`SCHEMA_VERSION` is the layout of the JSON record (`dli.bench.throughput.measure`). `versions`,
`git_state`, `device_name` and `load_average` describe where the figures were measured: the
libraries on the measured path (None: not installed), the source tree's commit and local
changes, the device, and the other work on a shared machine. `table` renders a record as the
short aligned table the command prints.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
"""Bumped when the JSON layout changes."""


# ---------------------------------------------------------------------------------------------
# Environment.


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Versions of the libraries on the measured path (None: not installed)."""
    import dli

    found: dict[str, str | None] = {"dli": dli.__version__, "python": platform.python_version()}
    for name, module in (
        ("torch", "torch"),
        ("nvidia-dali", "nvidia.dali"),
        ("cupy", "cupy"),
        ("segmentation-models-pytorch", "segmentation_models_pytorch"),
        ("timm", "timm"),
        ("numpy", "numpy"),
        ("opencv", "cv2"),
    ):
        try:
            found[name] = str(__import__(module, fromlist=["__version__"]).__version__)
        except (ImportError, OSError, RuntimeError):  # absent, or present but failing to load
            found[name] = None
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


def git_state() -> dict[str, Any]:
    """The commit of the source tree this module runs from and whether it has local changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *arguments], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine skews CPU figures."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The table.


def _rate(figure: dict[str, Any]) -> str:
    r = figure["images_per_s"]
    return f"{r['median']:10.1f}  [{r['min']:.1f} - {r['max']:.1f}]"


def _ms(figure: dict[str, Any] | None) -> str:
    if figure is None:
        return f"{'-':>10}"
    return f"{figure['median'] * 1e3:10.2f}  [{figure['min'] * 1e3:.2f} - {figure['max'] * 1e3:.2f}]"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def table(figures: dict[str, Any]) -> str:
    """The figures as a short aligned table."""
    s, data, k = figures["settings"], figures["data_path"], figures["kernels"]
    workers = f"DataLoader, {s['workers']} workers"
    device, load = figures["device"], figures["device"]["load_average_before"]
    lines = [
        f"dli bench on {device['type']} ({device['name']}, {device['cpu_count']} CPUs"
        + (f", load {load[0]:g}" if load else "")
        + f"), {s['data']} ({s['images']} images)",
        f"batch {s['batch_size']}, {s['image_size']}x{s['image_size']}, Poisson share {s['poisson_prob']:g}; "
        f"median [min - max] of {s['repeats']} windows x {s['batches']} batches after {s['warmup']} warm-up",
        *(
            ["one timed batch per figure: the ratios are indicative only (more: --repeats, --batches)"]
            if s["repeats"] * s["batches"] == 1
            else []
        ),
        "",
        f"{'data path':44}{'images/s':>10}",
        f"  {'DALI, no injection':42}{_rate(data['dali'])}",
        f"  {'DALI + DLI':42}{_rate(data['dali_dli'])}",
        f"  {'OpenCV ' + workers + ', no injection':42}{_rate(data['baseline'])}",
        f"  {'OpenCV ' + workers + ' + DLI':42}{_rate(data['baseline_dli'])}",
        f"  ours / OpenCV: {data['plain_over_baseline']:.2f} without injection, "
        f"{data['dli_over_baseline']:.2f} with DLI",
        *(
            f"  host ms per batch, {label}: "
            + ", ".join(f"{stage} {ms:.2f}" for stage, ms in data[name]["host_ms_per_batch"].items())
            for name, label in (("dali", "DALI"), ("dali_dli", "DALI + DLI"))
            if "host_ms_per_batch" in data[name]
        ),
        "",
        f"{'injection, mean per batch':44}{'ms':>10}   (over {k['batches']} batches with "
        f"{k['injections_per_batch']['poisson']:.1f} Poisson + {k['injections_per_batch']['paste']:.1f} "
        "cut-paste injections on average)",
    ]
    secs, its = k["seconds_per_batch"], k["poisson_iterations"]
    rows = [
        ("planner (host)", secs["planner"]),
        ("inject (all of it)", secs["inject"]),
        ("  cut-paste", secs["paste"]),
        ("  Poisson, boundary-matched start", secs["poisson"]),
        ("  Poisson, zero start", secs["poisson_zero_start"]),
        ("  Poisson setup only (max_iter=0)", secs["poisson_setup"]),
        ("OpenCV seamlessClone + NumPy paste", secs["opencv_inject"]),
    ]
    lines += [f"  {name:42}{_ms(value)}" for name, value in rows]
    lines.append(f"  ours / OpenCV for the same plan: {k['inject_speed_over_opencv']:.2f} (speed)")
    if its is not None:
        matched, zero = its["boundary_matched_start"], its["zero_start"]
        cg = k["cg_step"]
        lines.append(
            f"  CG iterations median/max: {matched['median']:g}/{matched['max']} (matched start), "
            f"{zero['median']:g}/{zero['max']} (zero start) over {matched['systems']} systems"
        )
        lines.append(
            f"  one CG step: {cg['traffic_bytes'] / 1e6:.2f} MB moved, "
            f"floor {cg['floor_seconds'] * 1e6:.1f} us at {cg['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"measured {cg['measured_seconds'] * 1e6:.1f} us"
        )
    model = figures.get("device_model")
    if model is not None:
        from dli.bench.poisson import device_model_line

        lines.append(f"  inject, {device_model_line(model)} (mean of {model['batches']} batches)")
    for encoder, t in figures["training"].items():
        title = f"training {encoder} ({t['precision']})"
        lines += ["", f"{title:44}{'images/s':>10}{'':22}peak torch memory"]
        for name, key in (
            ("pre-made tensors on the device", "premade"),
            ("DALI + DLI", "dali_dli"),
            ("OpenCV " + workers + " + DLI", "baseline_dli"),
        ):
            lines.append(f"  {name:42}{_rate(t[key]):32}{_mib(t[key]['memory']['peak_torch_bytes'])}")
        share = t["injection_share_of_step"]
        lines.append(
            f"  DLI / pre-made: {t['dli_over_premade']:.3f}; ours / OpenCV: {t['dli_over_baseline']:.2f}; "
            f"injection = {'-' if share is None else f'{100 * share:.1f}%'} of a "
            f"{t['premade_step_seconds'] * 1e3:.1f} ms step"
        )
    return "\n".join(lines)
