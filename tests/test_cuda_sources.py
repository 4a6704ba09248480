"""Every raw CUDA source of the package compiles with NVRTC for Ampere and Hopper, without a GPU.

NVRTC needs no device: CuPy's binding (`cupy_backends.cuda.libs.nvrtc`) finds the library in the
CUDA wheels a CPU install already has. Each `CUDA_SOURCES` entry of a `dli.kernels` module is one
program (subpackages' modules, e.g. `dli.kernels.poisson.direct_cuda`, included), with its name
expressions instantiated, compiled with the project's `CUDA_OPTIONS` for every
`CUDA_TEST_ARCHITECTURES` entry; any error or any warning in the log fails the test. A module
anywhere in the package that builds raw CUDA (`RawModule(`, `RawKernel(`, `ElementwiseKernel(`,
`ReductionKernel(`) without a `CUDA_SOURCES` in `dli.kernels` fails too, so
nothing escapes the compile check.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import dli
import dli.kernels
from dli.kernels.xp import CUDA_OPTIONS, CUDA_TEST_ARCHITECTURES

RAW_CUDA = re.compile(r"\b(RawModule|RawKernel|ElementwiseKernel|ReductionKernel)\s*\(")


def kernel_modules() -> list[ModuleType]:
    """Every module of `dli.kernels`, its subpackages' (`dli.kernels.poisson`) included."""
    prefix = dli.kernels.__name__ + "."
    return [
        importlib.import_module(info.name) for info in pkgutil.walk_packages(dli.kernels.__path__, prefix)
    ]


def package_sources() -> list[Path]:
    """The .py files of every module of the installed package (tests are no part of it)."""
    files = []
    for info in pkgutil.walk_packages(dli.__path__, dli.__name__ + "."):
        spec = info.module_finder.find_spec(info.name, None)  # type: ignore[call-arg]
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            files.append(Path(spec.origin))
    return files


def cuda_programs() -> list[tuple[str, str, tuple[str, ...]]]:
    programs = []
    for module in kernel_modules():
        for label, (code, names) in getattr(module, "CUDA_SOURCES", {}).items():
            programs.append((f"{module.__name__}:{label}", code, names))
    return programs


def test_every_module_with_raw_cuda_declares_its_sources() -> None:
    files = package_sources()
    assert any(path.name == "paste.py" for path in files) and len(files) > 20, files
    declared = {Path(inspect.getfile(m)) for m in kernel_modules() if hasattr(m, "CUDA_SOURCES")}
    with_raw_cuda = {path for path in files if RAW_CUDA.search(path.read_text(encoding="utf-8"))}
    assert with_raw_cuda, "no raw CUDA found: the scan is broken"
    undeclared = sorted(str(p) for p in with_raw_cuda - declared)
    assert not undeclared, f"raw CUDA outside a dli.kernels module's CUDA_SOURCES: {undeclared}"
    for path in with_raw_cuda:  # and the module builds from it rather than from another string
        assert "CUDA_SOURCES[" in path.read_text(encoding="utf-8"), path


def test_sources_are_well_formed() -> None:
    programs = cuda_programs()
    assert {label for label, _, _ in programs} >= {
        "dli.kernels.paste:paste",
        "dli.kernels.poisson.direct_cuda:direct",
    }
    for label, code, names in programs:
        assert isinstance(code, str) and "__global__" in code, label
        assert names and all(isinstance(n, str) and n for n in names), label


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        pytest.skip(f"CuPy's NVRTC binding is not importable: {error}")
    try:
        nvrtc.getVersion()
    except Exception as error:  # the binding imports but finds no libnvrtc
        pytest.skip(f"NVRTC library not found: {error}")
    return nvrtc


@pytest.mark.parametrize("architecture", CUDA_TEST_ARCHITECTURES)
@pytest.mark.parametrize("program", cuda_programs(), ids=lambda p: p[0])
def test_cuda_source_compiles_cleanly(nvrtc, program: tuple[str, str, tuple[str, ...]], architecture: str):
    label, code, names = program
    handle = nvrtc.createProgram(code, label.replace(":", "_") + ".cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(handle, name)
        options = [*CUDA_OPTIONS, f"--gpu-architecture={architecture}"]
        try:
            nvrtc.compileProgram(handle, options)
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{label} for {architecture}: {error}\n{nvrtc.getProgramLog(handle)}")
        log = nvrtc.getProgramLog(handle).strip()
        assert not log, f"{label} for {architecture} compiled with diagnostics:\n{log}"
        for name in names:
            assert nvrtc.getLoweredName(handle, name), name
        assert len(nvrtc.getCUBIN(handle)) > 0
    finally:
        nvrtc.destroyProgram(handle)


def test_a_warning_fails_the_check(nvrtc) -> None:
    """The check itself: NVRTC reports an unused variable in the log, which the test treats as a failure."""
    handle = nvrtc.createProgram("__global__ void k(int* x) { int unused; x[0] = 1; }", "w.cu", [], [])
    try:
        nvrtc.compileProgram(handle, [*CUDA_OPTIONS, f"--gpu-architecture={CUDA_TEST_ARCHITECTURES[0]}"])
        assert "warning" in nvrtc.getProgramLog(handle)
    finally:
        nvrtc.destroyProgram(handle)
