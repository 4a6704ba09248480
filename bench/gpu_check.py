"""A prepared GPU acceptance run: is this CUDA machine set up right for dli, and how fast is it?

    python bench/gpu_check.py --out DIR [--data MT_ROOT] [--minutes M] [--epochs E] [--dry-run]
    python -m dli.bench.gpu_check ...        # the same, with dli importable

Steps, in this order, each in a process of its own, timed, its output kept in DIR/logs/:

1. environment: GPUs, driver, Python, torch / CuPy / NVRTC / DALI / smp / timm versions and the
   CUDA major each was built for, with a loud warning when the majors differ;
2. pytest-gpu: `pytest -m gpu` over this checkout's tests (JUnit XML in DIR/pytest-gpu.xml);
3. bench: `dli bench --device cuda` (the data at `--data`, else the bundled synthetic set),
   figures in DIR/bench-cuda.json;
4. loader-host: `python -m dli.bench.loader_host --device cuda`: the training loader's host time
   per stage after a warm-up epoch, without and with the file cache, in DIR/loader-host.json;
5. train-bce, 6. train-dli: a short real training of l-ResNet18 with `bce` and with `dli`, the
   same epochs, run folders DIR/train-<method>/, reporting images/s and the best validation IoU.

Then DIR/gpu-report.md and DIR/gpu-report.json hold every figure, what was skipped and why, and
what failed, with the end of its output. A step that fails or runs out of time is reported and
the next one still runs. Exit status: 0 when every step ran and passed; 1 when one failed, ran
out of time or was skipped for a missing package (the machine is then not set up for dli, and the
report says which steps did not test anything); 2 for a bad flag.

Time. The budget (`--minutes`, default and most 8) is shared out by `SHARES`: each step may run
for its share of the time that is left, among the steps still to run, so time a step leaves
unused passes on to the later ones. A step past its limit is stopped (SIGTERM to its process
group, then SIGKILL) and reported as timed out; a stopped training still reports the epochs it
finished.

Missing pieces. Without a CUDA GPU visible to torch the environment step fails and the others
are skipped. Without CuPy, DALI, segmentation-models-pytorch or another package a step needs
(`REQUIRES`), that step is skipped with the reason and the check fails; `pytest -m gpu` still
runs where it can, and test modules that cannot be imported for a missing package are listed as
not collected, not as failures. An `--out` that
holds an earlier check is refused rather than overwritten.

`--dry-run` checks what it can without a GPU (the imports, the data, the output folder), prints
the plan of steps with their time shares and commands, writes nothing and exits 0.

What the environment probe reads lives in `dli.bench.gpu_environment`, how the steps' files are
read back and the report written in `dli.bench.gpu_report`. Only the standard library is imported
at module level (here and there), so the check runs (and reports) where torch or CuPy are broken.
Run from a checkout where dli is not installed, the script makes the checkout importable as `dli`
itself (a link in a temporary folder) for its child processes too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__:
    from dli.bench import gpu_environment, gpu_report
else:  # run as a script (`python bench/gpu_check.py`), where dli may not be importable yet
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also under `python -P`
    import gpu_environment
    import gpu_report

PROG = "gpu_check"
MAX_MINUTES = 8.0
"""The most a check may take: a lent GPU comes for about 15 minutes in all."""
DEFAULT_EPOCHS = 10
TRAIN_BATCH, TRAIN_IMAGE_SIZE = 32, 256
BENCH_FLAGS = ("--repeats", "3", "--batches", "5", "--warmup", "2")
"""`dli bench` windows sized to fit its share (medians of 3 windows of 5 batches)."""
LOADER_HOST_FLAGS = ("--budgets", "0", "512", "--batches", "8")
"""`bench.loader_host` without and with the file cache, 8 timed batches after each warm-up epoch."""
STOP_GRACE_S = 10.0
REPORT_RESERVE_S = 5.0
"""Kept back from the steps for writing the report."""

STEPS = ("environment", "pytest-gpu", "bench", "loader-host", "train-bce", "train-dli")
SHARES: dict[str, float] = {
    "environment": 0.05,
    "pytest-gpu": 0.25,
    "bench": 0.22,
    "loader-host": 0.1,
    "train-bce": 0.19,
    "train-dli": 0.19,
}
MIN_SECONDS: dict[str, float] = {"environment": 30.0}
"""Floors under a step's share (importing torch, CuPy and DALI takes a while on a busy machine)."""
_DLI_CORE = ("torchvision", "yaml", "pillow")
"""What importing dli itself needs beyond torch and NumPy (the tests' conftest imports it too)."""
REQUIRES: dict[str, tuple[str, ...]] = {
    "environment": (),
    "pytest-gpu": ("gpu", "pytest", *_DLI_CORE),
    "bench": ("gpu", "cupy", "dali", "smp", "timm", "opencv", *_DLI_CORE),
    "loader-host": ("gpu", "cupy", "dali", "smp", "timm", *_DLI_CORE),
    "train-bce": ("gpu", "cupy", "dali", "smp", "timm", "tensorboard", "matplotlib", *_DLI_CORE),
    "train-dli": ("gpu", "cupy", "dali", "smp", "timm", "tensorboard", "matplotlib", *_DLI_CORE),
}


class CheckError(Exception):
    """A bad flag value: one line `gpu_check: error: ...`, exit status 2."""


def missing_reason(step: str, have: set[str]) -> str | None:
    """Why `step` cannot run here, or None."""
    missing = [name for name in REQUIRES[step] if name not in have]
    if not missing:
        return None
    words = {
        "gpu": "a CUDA GPU (torch sees none)",
        "dali": "NVIDIA DALI",
        "smp": "segmentation-models-pytorch",
    }
    return "needs " + ", ".join(words.get(name, name) for name in missing) + ": not available here"


def skip_reason(step: str, plan: Plan, have: set[str]) -> str | None:
    """Why `step` will be skipped with this environment and checkout, or None: the one rule the run,
    its time shares and the dry run all follow."""
    if step == "pytest-gpu" and not (plan.repo / "tests").is_dir():
        return f"no tests/ folder in {plan.repo} (run the check from a checkout)"
    return missing_reason(step, have)


# ---------------------------------------------------------------------------------------------
# Steps: what each runs and what it reports.


@dataclass
class StepResult:
    """One step as it ran (or did not)."""

    name: str
    status: str  # passed | failed | timed_out | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    command: list[str] = field(default_factory=list)
    log: str | None = None
    returncode: int | None = None
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    output_tail: str = ""


@dataclass(frozen=True)
class Plan:
    """A check's settings and the paths it writes."""

    out: Path
    data: Path | None
    minutes: float
    epochs: int
    repo: Path

    @property
    def budget_s(self) -> float:
        return self.minutes * 60.0

    def command(self, step: str) -> list[str]:
        python = sys.executable
        if step == "environment":
            return [python, "-m", "dli.bench.gpu_check", "--probe", str(self.out / "environment.json")]
        if step == "pytest-gpu":
            return [
                *(python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"),
                *("--continue-on-collection-errors", f"--junitxml={self.out / 'pytest-gpu.xml'}"),
                str(self.repo / "tests"),
            ]
        if step == "bench":
            data = ["--data", str(self.data)] if self.data else []
            return [
                *(python, "-m", "dli", "bench", "--device", "cuda", *data, *BENCH_FLAGS),
                *("--json", str(self.out / "bench-cuda.json")),
            ]
        if step == "loader-host":
            data = ["--data", str(self.data) if self.data else "synthetic"]  # as the bench step
            return [
                *(python, "-m", "dli.bench.loader_host", "--device", "cuda", *data, *LOADER_HOST_FLAGS),
                *("--json", str(self.out / "loader-host.json")),
            ]
        method = step.removeprefix("train-")
        return [python, "-m", "dli", "train", *self.train_flags(method)]

    def train_flags(self, method: str) -> list[str]:
        from dli.training.config import TrainConfig

        config = TrainConfig(
            data=None if self.data is None else str(self.data),
            method=method,
            encoder="l-resnet18",
            pretrained=False,  # no download on an offline machine; both methods start alike
            epochs=self.epochs,
            batch_size=TRAIN_BATCH,
            image_size=TRAIN_IMAGE_SIZE,
            device="cuda",
            progress=False,
            num_threads=4,
            out=str(self.out / f"train-{method}"),
        )
        return config.to_argv()


def limit_for(step: str, remaining: Sequence[str], seconds_left: float) -> float:
    """`step`'s share of the time left, among the steps still to run (`remaining`, step included)."""
    total = sum(SHARES[s] for s in remaining)
    share = max(seconds_left * SHARES[step] / total, MIN_SECONDS.get(step, 0.0))
    return max(0.0, min(share, seconds_left))


def run_process(
    command: Sequence[str], log: Path, limit_s: float, env: Mapping[str, str], cwd: Path
) -> tuple[int | None, bool, float]:
    """Run `command` with output to `log`; stop its process group past `limit_s`.

    Returns (exit status or None when stopped, whether it timed out, seconds).
    """
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(
            list(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        try:
            code: int | None = process.wait(timeout=max(limit_s, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(process)
            code, timed_out = None, True
        except BaseException:  # Ctrl-C of the check: take the step down with it
            _stop(process)
            raise
    return code, timed_out, time.monotonic() - started


def _stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the step's process group (it started a session of its own), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run_step(step: str, plan: Plan, limit_s: float, env: Mapping[str, str], have: set[str]) -> StepResult:
    """Run one step within `limit_s` and read what it produced."""
    result = StepResult(name=step, status="skipped", limit_s=round(limit_s, 1))
    reason = skip_reason(step, plan, have)
    if reason:
        result.reason = reason
        return result
    result.command = plan.command(step)
    log = plan.out / "logs" / f"{STEPS.index(step) + 1}-{step}.log"
    result.log = str(log)
    code, timed_out, seconds = run_process(result.command, log, limit_s, env, plan.repo)
    result.returncode, result.seconds = code, round(seconds, 1)
    ok = code == 0
    if step == "pytest-gpu":
        result.figures, tests_ok = gpu_report.pytest_figures(plan.out / "pytest-gpu.xml")
        ok = ok or (code == 1 and tests_ok)  # collection errors for missing packages only
    elif step == "bench":
        result.figures = gpu_report.bench_figures(plan.out / "bench-cuda.json")
    elif step == "loader-host":
        result.figures = gpu_report.loader_host_figures(plan.out / "loader-host.json")
    elif step.startswith("train-"):
        result.figures = gpu_report.training_figures(plan.out / step)
    result.status = "timed_out" if timed_out else "passed" if ok else "failed"
    if result.status != "passed":
        result.output_tail = gpu_report.tail(log)
        result.reason = f"stopped past its {limit_s:.0f} s" if timed_out else f"exit status {code}"
    return result


# ---------------------------------------------------------------------------------------------
# The check.


def child_environment(out: Path, extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DLI_CACHE", str(out / "cache"))  # the synthetic data, when no --data is given
    env.setdefault("HF_HUB_OFFLINE", "1")  # no weight download attempts on an offline machine
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (extra_path, env.get("PYTHONPATH"))))
    return env


def probe(env: Mapping[str, str], out_file: Path, limit_s: float, repo: Path) -> tuple[dict[str, Any], float]:
    """The environment, read by a child process (a crashing import cannot take the check down)."""
    command = [sys.executable, "-m", "dli.bench.gpu_check", "--probe", str(out_file)]
    log = out_file.with_suffix(".log")
    code, timed_out, seconds = run_process(command, log, limit_s, env, repo)
    try:
        found = json.loads(out_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = {"error": "timed out" if timed_out else f"exit status {code}", "output": gpu_report.tail(log)}
    return found, seconds


def environment_step(plan: Plan, env: Mapping[str, str], limit_s: float) -> tuple[StepResult, dict[str, Any]]:
    """Step 1: probe the environment; it fails when the probe does or torch sees no GPU."""
    result = StepResult(name="environment", status="passed", limit_s=round(limit_s, 1))
    found, seconds = probe(env, plan.out / "environment.json", limit_s, plan.repo)
    result.seconds, result.log = round(seconds, 1), str(plan.out / "environment.log")
    if "error" in found:
        result.status, result.reason, result.output_tail = "failed", found["error"], found["output"]
    elif not found.get("gpus"):
        result.status, result.reason = "failed", "torch sees no CUDA GPU"
    result.figures = {"warnings": found.get("warnings", [])}
    for warning in found.get("warnings", []):
        print(gpu_report.loud(warning), file=sys.stderr, flush=True)
    return result, found


def check(plan: Plan, extra_path: str | None, started: float) -> tuple[dict[str, Any], int]:
    """Run every step within the budget counted from `started` (monotonic); write the reports."""
    started_at = datetime.now(timezone.utc)
    deadline = started + plan.budget_s - REPORT_RESERVE_S
    plan.out.mkdir(parents=True, exist_ok=True)
    env = child_environment(plan.out, extra_path)
    results: list[StepResult] = []
    found: dict[str, Any] = {}
    try:
        for position, step in enumerate(STEPS):
            # Shares among the steps still to run that can run: a skipped step leaves its time.
            have = gpu_environment.available(found)
            runnable = [
                s for s in STEPS[position:] if s == step or not found or skip_reason(s, plan, have) is None
            ]
            limit_s = limit_for(step, runnable, deadline - time.monotonic())
            print(f"{PROG}: {step} (up to {limit_s:.0f} s) ...", file=sys.stderr, flush=True)
            if step == "environment":
                result, found = environment_step(plan, env, limit_s)
            elif "error" in found:
                result = StepResult(
                    step, "skipped", limit_s=round(limit_s, 1), reason="the environment is unknown"
                )
            else:
                result = run_step(step, plan, limit_s, env, gpu_environment.available(found))
            print(f"{PROG}: {step}: {result.status}" + (f" ({result.reason})" if result.reason else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
            results.append(result)
    finally:
        report = {
            "schema": 1,
            "date": started_at.isoformat(timespec="seconds"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
            "budget_s": plan.budget_s,
            "seconds": round(time.monotonic() - started, 1),
            "data": str(plan.data) if plan.data else "bundled synthetic data",
            "epochs": plan.epochs,
            "environment": found,
            "warnings": found.get("warnings", []),
            "steps": [asdict(r) for r in results],
            "failed": [r.name for r in results if r.status in ("failed", "timed_out")],
            "skipped": {r.name: r.reason for r in results if r.status == "skipped"},
        }
        gpu_report.write_atomically(plan.out / "gpu-report.json", json.dumps(report, indent=2) + "\n")
        gpu_report.write_atomically(plan.out / "gpu-report.md", gpu_report.markdown(report))
    return report, 1 if report["failed"] or report["skipped"] else 0


# ---------------------------------------------------------------------------------------------
# Dry run and command line.


def dry_run(plan: Plan, extra_path: str | None) -> int:
    """Check the imports, the data and the output folder; print the plan; write nothing."""
    env = child_environment(plan.out, extra_path)
    with tempfile.TemporaryDirectory(prefix="dli-gpu-check-") as scratch:
        found, _ = probe(env, Path(scratch) / "environment.json", 120.0, plan.repo)
    if "error" in found:
        print(f"{PROG}: the environment probe failed ({found['error']}):\n{found['output']}")
        found = {}
    have = gpu_environment.available(found)
    packages = found.get("packages", {})
    data = plan.data or "bundled synthetic data"
    print(f"{PROG} dry run: {plan.minutes:g} minutes, data {data}, out {plan.out}")
    for name, package in packages.items():
        print(f"  {name:28} {package.get('version') or 'MISSING (' + str(package.get('error')) + ')'}")
    gpus = ", ".join(g["name"] for g in found.get("gpus", [])) or "none visible"
    print(f"  {'GPUs':28} {gpus}")
    for warning in found.get("warnings", []):
        print(gpu_report.loud(warning))
    reserve = f"{REPORT_RESERVE_S:.0f} s of it for the report"
    print(f"\nplan ({plan.budget_s:.0f} s, {reserve}; time a step leaves unused passes on):")
    budget = plan.budget_s - REPORT_RESERVE_S
    for step in STEPS:  # the limits if every step used its whole share
        reason = skip_reason(step, plan, have)
        state = f"skip: {reason}" if reason else "run"
        share = f"{100 * SHARES[step]:4.1f}%  {limit_for(step, (step,), budget * SHARES[step]):5.0f} s"
        print(f"  {STEPS.index(step) + 1}. {step:12} {share}  {state}")
        print(f"       {shlex.join(plan.command(step))}")
    print(f"\nreports: {plan.out / 'gpu-report.md'}, {plan.out / 'gpu-report.json'}")
    return 0


def check_data(data: Path) -> str:
    """Read and validate `--data` up front (as training would): a summary line, or CheckError."""
    from dli.common.errors import DliError
    from dli.data.manifest import read_dataset
    from dli.data.validation import validate

    try:
        manifest = read_dataset(data)
        validate(manifest)
    except DliError as error:
        raise CheckError(f"--data {data}: {error}") from None
    return f"{len(manifest)} images, classes {', '.join(manifest.class_names)}"


def check_out(out: Path) -> None:
    """The output folder is new, or a writable folder that holds no earlier check."""
    if (out / "gpu-report.json").exists() or any(out.glob("train-*")):
        raise CheckError(f"--out {out}: holds an earlier check; choose another folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckError(f"--out {out}: {existing} is not a writable folder")


def importable_checkout() -> str | None:
    """Make `import dli` import this checkout (also in child processes); the folder to put on PYTHONPATH.

    None when it does already (installed, or on the path); otherwise the checkout's parent when the
    checkout is a folder named `dli`, else a temporary folder holding a link `dli` to it.
    """
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec("dli")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == root / "__init__.py":
        return None
    if not (root / "pyproject.toml").is_file() or not (root / "__init__.py").is_file():
        raise CheckError(
            f"{root} is not a dli checkout and dli is not installed from it: install the project"
        )
    if root.name == "dli":
        folder = str(root.parent)
    else:
        folder = tempfile.mkdtemp(prefix="dli-import-")
        os.symlink(root, Path(folder) / "dli")
    sys.path.insert(0, folder)
    return folder


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the reports, logs and run folders")
    parser.add_argument("--data", type=Path, help="Magnetic Tile root (or any dataset); default synthetic")
    parser.add_argument(
        "--minutes", type=float, default=MAX_MINUTES, help=f"time budget, at most {MAX_MINUTES:g}"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of each short training")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan without running it")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # child: write the environment JSON
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()  # the budget covers the data check too
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe is not None:
        found = gpu_environment.probe_environment()
        args.probe.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
        return 0
    try:
        if args.out is None:
            raise CheckError("--out DIR is required")
        if not 0 < args.minutes <= MAX_MINUTES:
            raise CheckError(f"--minutes {args.minutes:g}: must be in (0, {MAX_MINUTES:g}]")
        if args.epochs < 1:
            raise CheckError(f"--epochs {args.epochs}: must be >= 1")
        extra_path = importable_checkout()
        check_out(args.out.absolute())
        data = None if args.data is None else args.data.absolute()
        if data is not None:
            print(f"{PROG}: --data {data}: {check_data(data)}", file=sys.stderr)
        plan = Plan(
            out=args.out.absolute(),
            data=data,
            minutes=args.minutes,
            epochs=args.epochs,
            repo=Path(__file__).resolve().parents[1],
        )
        if args.dry_run:
            return dry_run(plan, extra_path)
        report, status = check(plan, extra_path, started)
    except CheckError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(gpu_report.markdown(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
