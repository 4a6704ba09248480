"""What a GPU check's steps produced, read back, and the report people read.

The figures of each step come from its own files: the JUnit XML of `pytest -m gpu`
(`pytest_figures`: counts, failing tests, modules not collected for a missing package), the JSON of
`dli bench --device cuda` (`bench_figures`: headline images/s, `inject` and Poisson ms per batch
beside the device model of the same batches) and a training's `metrics.jsonl` (`training_figures`).
`markdown(report)` renders `gpu-report.json` as `gpu-report.md`: warnings first, then one row per step.

Only the standard library is imported at module level, like the check itself.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def pytest_figures(xml_path: Path) -> tuple[dict[str, Any], bool]:
    """Counts, failing tests and modules not collected for a missing package; (figures, all good)."""
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError):
        return {"junit": None}, False
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"junit": None}, False
    figures: dict[str, Any] = {
        key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")
    }
    failing, not_collected = [], {}
    for case in suite.iter("testcase"):
        name = ".".join(filter(None, (case.get("classname"), case.get("name"))))
        for problem in (*case.findall("failure"), *case.findall("error")):
            text = (problem.get("message") or "") + "\n" + (problem.text or "")
            missing = re.search(r"No module named '([^']+)'", text)
            if problem.get("message") == "collection failure" and missing:
                not_collected[name] = f"needs {missing.group(1)} (missing)"
            else:
                failing.append(name)
    figures |= {"passed": figures["tests"] - figures["failures"] - figures["errors"] - figures["skipped"]}
    figures |= {"failing": failing, "not_collected": not_collected}
    return figures, not failing and (figures["tests"] > 0 or bool(not_collected))


def bench_figures(path: Path) -> dict[str, Any]:
    """The headline figures of `dli bench`'s JSON (images/s medians, ms per batch)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

    def median(*keys: str) -> float | None:
        value: Any = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, (int, float)) else None

    figures: dict[str, Any] = {
        "device": (record.get("device") or {}).get("name"),
        "data_images_per_s": {
            name: median("data_path", name, "images_per_s", "median")
            for name in ("dali", "dali_dli", "baseline", "baseline_dli")
        },
        "data_host_ms_per_batch": {
            name: (record.get("data_path") or {}).get(name, {}).get("host_ms_per_batch")
            for name in ("dali", "dali_dli")
        },
        "inject_ms_per_batch": _ms(median("kernels", "seconds_per_batch", "inject", "median")),
        "poisson_ms_per_batch": _ms(median("kernels", "seconds_per_batch", "poisson", "median")),
        "training_images_per_s": {},
        # The device model of the same batches' `inject` (counted on the CPU) beside its time.
        "inject_device_model": {key: median("device_model", key) for key in ("launches", "bytes")},
    }
    launches, inject_ms = figures["inject_device_model"]["launches"], figures["inject_ms_per_batch"]
    figures["inject_us_per_modelled_launch"] = (
        1e3 * inject_ms / launches if launches and inject_ms is not None else None
    )
    for encoder, training in (record.get("training") or {}).items():
        figures["training_images_per_s"][encoder] = {
            name: (training.get(name) or {}).get("images_per_s", {}).get("median")
            for name in ("premade", "dali_dli", "baseline_dli")
        }
    return figures


_NOT_STAGES = frozenset({"wall_ms", "batches", "cached_files", "cached_mb"})
"""`bench.loader_host`'s keys per loader that are not host stages."""


def loader_host_figures(path: Path) -> dict[str, Any]:
    """`bench.loader_host`'s JSON: per loader and cache budget, wall and host-stage ms per batch."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {name: value for name, value in record.items() if isinstance(value, dict)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def training_figures(run: Path) -> dict[str, Any]:
    """Epochs finished, images/s (median over epochs after the first) and the best IoU of a run folder."""
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        records = []
    rates = [r["images_per_s"] for r in records if isinstance(r.get("images_per_s"), (int, float))]
    steady = rates[1:] or rates
    ious = [r["iou"] for r in records if isinstance(r.get("iou"), (int, float))]
    return {
        "epochs_finished": len(records),
        "images_per_s": sorted(steady)[len(steady) // 2] if steady else None,
        "images_per_s_first_epoch": rates[0] if rates else None,
        "best_iou": max(ious) if ious else None,
        "best_epoch": records[ious.index(max(ious))]["epoch"] if ious else None,
        "run_folder": str(run),
    }


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def loud(message: str) -> str:
    bar = "!" * 100
    return f"{bar}\n!!! WARNING: {message}\n{bar}"


def _value(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: Mapping[str, Any]) -> str:
    """The report for people: warnings first, then one row per step and its figures."""
    env = report["environment"]
    gpus = env.get("gpus") or []
    lines = [
        "# dli GPU check",
        "",
        f"{report['date']}, {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget; data: "
        f"{report['data']}; `{report['command']}`",
        "",
    ]
    for warning in report["warnings"]:
        lines += [f"> **WARNING: {warning}**", ""]
    for name, reason in report["skipped"].items():  # a skipped step tested nothing: the check fails
        lines += [f"> **NOT TESTED: {name} was skipped ({reason})**", ""]
    lines += ["## Environment", "", "| what | value |", "|---|---|"]
    gpu_text = "; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in gpus) or "none"
    lines += [f"| GPU | {gpu_text} |", f"| driver | {env.get('driver') or '-'} |"]
    lines += [f"| python | {env.get('python', '-')} |", f"| dli | {env.get('dli') or '-'} |"]
    for name, package in (env.get("packages") or {}).items():
        lines.append(f"| {name} | {package.get('version') or 'missing: ' + str(package.get('error'))} |")
    majors = env.get("cuda_majors") or {}
    lines += [f"| CUDA majors | {', '.join(f'{k} {v}' for k, v in sorted(majors.items())) or '-'} |", ""]
    lines += ["## Steps", "", "| step | status | seconds (limit) | notes |", "|---|---|---:|---|"]
    for step in report["steps"]:
        notes = step.get("reason") or ""
        lines.append(
            f"| {step['name']} | {step['status']} | {step['seconds']:.0f} ({step['limit_s']:.0f}) | {notes} |"
        )
    lines.append("")
    for step in report["steps"]:
        figures = step.get("figures") or {}
        if step["name"] == "pytest-gpu" and figures.get("tests") is not None:
            lines += [
                f"**pytest -m gpu**: {figures['passed']} passed, {figures['failures']} failed, "
                f"{figures['errors']} errors, {figures['skipped']} skipped",
                "",
            ]
            lines += [f"- failing: `{name}`" for name in figures.get("failing", [])]
            lines += [
                f"- not collected: `{n}` ({why})" for n, why in figures.get("not_collected", {}).items()
            ]
            lines.append("")
        elif step["name"] == "bench" and figures:
            data = figures.get("data_images_per_s", {})
            lines += [
                "**dli bench** (images/s): " + ", ".join(f"{k} {_value(v)}" for k, v in data.items())
                + f"; inject {_value(figures.get('inject_ms_per_batch'), 2)} ms/batch, Poisson "
                f"{_value(figures.get('poisson_ms_per_batch'), 2)} ms/batch",
            ]  # fmt: skip
            model = figures.get("inject_device_model") or {}
            if model.get("launches"):
                lines.append(
                    f"- inject's device model: {_value(model['launches'])} launches, "
                    f"{_value((model.get('bytes') or 0) / 1e9, 2)} GB per batch; "
                    f"{_value(figures.get('inject_us_per_modelled_launch'), 1)} µs measured per "
                    "modelled launch"
                )
            for name, stages in (figures.get("data_host_ms_per_batch") or {}).items():
                if stages:
                    lines.append(
                        f"- host ms per batch, {name}: "
                        + ", ".join(f"{stage} {_value(ms, 2)}" for stage, ms in stages.items())
                    )
            for encoder, rates in figures.get("training_images_per_s", {}).items():
                lines.append(
                    f"- training {encoder} (images/s): "
                    + ", ".join(f"{k} {_value(v)}" for k, v in rates.items())
                )
            lines.append("")
        elif step["name"] == "loader-host" and figures:
            lines.append("**loader host time** (ms per batch after a warm-up epoch):")
            for name, run in figures.items():
                stages = ", ".join(f"{k} {_value(v, 2)}" for k, v in run.items() if k not in _NOT_STAGES)
                cached = f"{run.get('cached_files')} files ({_value(run.get('cached_mb'), 1)} MB) cached"
                lines.append(f"- {name}: wall {_value(run.get('wall_ms'), 1)}; host: {stages}; {cached}")
            lines.append("")
        elif step["name"].startswith("train-") and figures:
            lines += [
                f"**{step['name']}**: {figures['epochs_finished']} epochs, {_value(figures['images_per_s'])} "
                f"images/s (first epoch {_value(figures['images_per_s_first_epoch'])}), best IoU "
                f"{_value(figures['best_iou'], 4)} at epoch {_value(figures['best_epoch'])}",
                "",
            ]
    for step in report["steps"]:
        if step.get("output_tail"):
            lines += [
                f"### {step['name']}: end of its output ({step.get('log')})",
                "",
                "```",
                step["output_tail"],
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"
