"""`dli export`: a checkpoint's model as ONNX, checked against torch before it is written.

The graph comes from torch's ONNX exporter (`torch.onnx.export(dynamo=True)`: `torch.export`
then onnxscript) with dynamic batch, height and width. With torch 2.14 both of torch's exporters
handle smp's UNet; the TorchScript one (`dynamo=False`) is deprecated since torch 2.9.

Input `images`: the normalized (N, C, H, W) float32 batch the checkpoint's model takes, H and W
multiples of the encoder's stride; output `logits`: its per-class logits, float32. `--half`
computes in float16 inside the graph (a cast at each end keeps the input and output float32).
The metadata a deployment needs is embedded in `metadata_props` (`dli.inference.onnx_model.OnnxMetadata`):
class names, input and image channels, normalization and its source, the training image size,
the per-class thresholds (the checkpoint's calibrated ones unless `--threshold`), the tiling of a
model trained on crops (`dli.pipeline.tiling.Tiling`: tile size, overlap, window, scale), and the dli
version and commit.

Before anything is written, onnxruntime runs the export and torch runs the checkpoint's model
(float32, CPU) on the same random batches of two sizes (batch 2), and both prediction paths
(`dli predict --checkpoint` and `--onnx`, each with its own preprocessing: resize as in
training, normalization, resize back) run on two MT-like uint8 images of sizes other than the
training size; if a sigmoid probability differs by more than `TOLERANCE` (1e-4;
`HALF_TOLERANCE` with `--half`), the command fails and writes nothing. The file is written
atomically, never over the checkpoint it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dli.common import progress
from dli.common.atomic import atomic_write_bytes, is_read_only
from dli.common.errors import DliError
from dli.inference.onnx_model import (
    FORMAT_VERSION,
    GRAY_FORMAT_VERSION,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxMetadata,
    OnnxModel,
    sigmoid,
)
from dli.models.checkpoint import ModelInfo, add_checkpoint_argument, load_checkpoint, model_from_checkpoint
from dli.models.thresholds import thresholds_of
from dli.models.unet import encoder_spec

TOLERANCE = 1e-4
"""Largest allowed |p_onnx - p_torch| of a float32 export."""

HALF_TOLERANCE = 1e-2
"""Largest allowed |p_onnx - p_torch| of a `--half` export (float16 keeps about 3 decimal digits)."""

MIN_OPSET = 7
"""The lowest `--opset` asked of the exporter (onnxruntime reads opset 7 and later)."""

CHECK_BATCH = 2
"""Images per random batch of the parity check."""

MAX_CHECK_SIDE = 4096
"""Largest height or width `--check-sizes` accepts (the CPU memory of a forward pass grows with it)."""

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""Terminal colour and cursor codes (kept out of the one-line error)."""

_SIZE = re.compile(r"^(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class ParityCheck:
    """The largest probability difference between onnxruntime and torch at one input shape."""

    shape: tuple[int, ...]
    max_difference: float
    what: str = "input"


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and measured."""

    path: Path
    metadata: OnnxMetadata
    checks: tuple[ParityCheck, ...]
    tolerance: float

    def summary(self) -> str:
        checks = ", ".join(
            f"{c.max_difference:.1e} at {c.what} {'x'.join(map(str, c.shape))}" for c in self.checks
        )
        return (
            f"exported {self.path} (opset {self.metadata.opset}, {self.metadata.precision}, dynamic batch, "
            f"height and width in multiples of {self.metadata.input_stride}; thresholds "
            f"{', '.join(f'{v:.3f}' for v in self.metadata.thresholds)} ({self.metadata.threshold_rule}))\n"
            f"onnxruntime vs torch, largest probability difference: {checks} (tolerance {self.tolerance:g})"
        )


def parse_size(text: str) -> tuple[int, int]:
    """`"96"` -> (96, 96), `"64x96"` -> (64, 96) (height x width); `DliError` otherwise."""
    match = _SIZE.match(text.strip())
    if not match:
        raise DliError(f"--check-sizes {text}: expected S or HxW, e.g. 128 or 128x192")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def default_check_sizes(image_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The training size (rounded up to a multiple of `stride`), and a non-square one (taller by
    one stride, wider by two)."""
    side = max(stride, -(-image_size // stride) * stride)
    return (side, side), (side + stride, side + 2 * stride)


def default_output(checkpoint: str | Path) -> Path:
    """Where the model goes without `--out`: beside the checkpoint, `<stem>.onnx`."""
    return Path(checkpoint).with_suffix(".onnx")


def source_commit() -> str:
    """The git commit of the dli sources (`+dirty` with uncommitted changes); "unknown" outside git."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if status else commit or "unknown"


class _HalfPrecision(nn.Module):
    """`model` computing in float16 between a float32 input and a float32 output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


def check_writable(path: Path, inputs: Sequence[Path] = (), *, what: str = "--out") -> None:
    """`DliError` unless `path` can be created or replaced (checked before the slow export).

    `path` must not be, nor link to, any of `inputs` (writing it would replace the input).
    `what` names `path` in the messages (`--out`, or how it was chosen when `--out` was not given).
    """
    if path.is_dir():
        raise DliError(f"{what} {path}: is a folder; give a file name such as model.onnx")
    for source in inputs:
        if path.absolute() == source.absolute() or (
            path.exists() and source.exists() and os.path.samefile(path, source)
        ):
            raise DliError(f"{what} {path}: is the input {source}; give another file name")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise DliError(f"{what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or is_read_only(path):
        raise DliError(f"{what} {path}: not writable")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """Silence the exporter's progress prints, warnings and log lines (yields the prints)."""
    captured = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_graph(model: nn.Module, image_size: int, *, channels: int, opset: int | None) -> bytes:
    """The serialized ONNX graph of `model` with dynamic batch, height and width."""
    dim = torch.export.Dim
    example = torch.zeros(1, channels, image_size, image_size)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: dim("batch"), 2: dim("height"), 3: dim("width")},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        except Exception as error:  # the exporter's errors are of many types
            text = _ANSI_ESCAPE.sub("", str(error)).strip()  # the exporter colours its messages
            first_line = text.splitlines()[0][:300] if text else ""
            raise DliError(f"the ONNX exporter failed: {type(error).__name__}: {first_line}") from None
    return program.model_proto.SerializeToString()


def _opset_of(model_bytes: bytes) -> int:
    import onnx

    proto = onnx.load_from_string(model_bytes)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _with_metadata(model_bytes: bytes, metadata: OnnxMetadata) -> bytes:
    import onnx

    proto = onnx.load_from_string(model_bytes)
    kept = [p for p in proto.metadata_props if not p.key.startswith("dli.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"dli {metadata.encoder} UNet: normalized images -> per-class logits"
    return proto.SerializeToString()


def check_parity(
    model: nn.Module, exported: OnnxModel, sizes: Sequence[tuple[int, int]], *, seed: int = 0
) -> tuple[ParityCheck, ...]:
    """Run torch (float32) and onnxruntime on the same random batches; the largest differences."""
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for height, width in sizes:
        channels = exported.metadata.input_channels
        inputs = torch.randn(CHECK_BATCH, channels, height, width, generator=generator)
        with torch.no_grad():
            expected = torch.sigmoid(model(inputs)).numpy()
        actual = sigmoid(exported.logits(inputs.numpy()))
        if actual.shape != expected.shape:
            raise DliError(f"the export returns shape {actual.shape} where torch returns {expected.shape}")
        difference = (
            float(np.nanmax(np.abs(actual - expected))) if np.isfinite(actual).all() else float("inf")
        )
        checks.append(ParityCheck((CHECK_BATCH, channels, height, width), difference))
    return tuple(checks)


def parity_images(image_size: int, seed: int = 0) -> list[np.ndarray]:
    """Two MT-like uint8 tiles with a defect, one taller and one wider than `image_size` (neither a
    multiple of it), so that resizing them down and up is part of what the check compares."""
    from dli.data.synth import render

    rng = np.random.default_rng(seed)
    sizes = (
        (image_size * 3 // 2 + 7, image_size * 2 // 3 + 5),
        (image_size * 2 // 3 + 3, image_size * 5 // 4 + 9),
    )
    return [render(rng, class_id, size)[0] for class_id, size in enumerate(sizes)]


def check_image_parity(document: Mapping[str, Any], exported: OnnxModel) -> tuple[ParityCheck, ...]:
    """`dli predict --checkpoint` against `dli predict --onnx` on `parity_images`: each path's own
    preprocessing (resize mode included), model and resize back, compared as probabilities."""
    from dli.predict import CheckpointPredictor

    reference = CheckpointPredictor(document, device="cpu")
    checks = []
    for gray in parity_images(exported.metadata.image_size):
        (expected,) = reference.probabilities([gray])
        (actual,) = exported.probabilities([gray])
        difference = float(np.abs(actual - expected).max()) if np.isfinite(actual).all() else float("inf")
        checks.append(ParityCheck(gray.shape, difference, "image"))
    return tuple(checks)


def export_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    half: bool = False,
    threshold: float | None = None,
    check_sizes: Sequence[tuple[int, int]] | None = None,
) -> ExportResult:
    """Export `checkpoint`'s model to `out` (default: beside it, `.onnx`) after the parity check."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 - checked here, used by OnnxModel
        import onnxscript  # noqa: F401 - the dynamo exporter's translator
    except ImportError as error:
        raise DliError(
            f"dli export needs onnx, onnxscript and onnxruntime ({error.name} is missing): "
            "pip install 'dli[export]'"
        ) from None

    what = "--out" if out is not None else "the output (beside the checkpoint)"
    out = Path(out) if out is not None else default_output(checkpoint)
    max_opset = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= max_opset:
        raise DliError(f"--opset {opset}: must be in [{MIN_OPSET}, {max_opset}] (this onnx)")
    document = load_checkpoint(checkpoint)
    model, info = model_from_checkpoint(document)
    stride = 2 ** encoder_spec(info.encoder).depth
    sizes = tuple(check_sizes) if check_sizes else default_check_sizes(info.image_size, stride)
    for height, width in sizes:
        if height < stride or width < stride or height % stride or width % stride:
            raise DliError(
                f"--check-sizes {height}x{width}: height and width must be multiples of {stride} "
                f"(the stride of encoder {info.encoder})"
            )
        if max(height, width) > MAX_CHECK_SIDE:
            raise DliError(
                f"--check-sizes {height}x{width}: at most {MAX_CHECK_SIDE} per side (the check runs the "
                "model at that size on the CPU, twice)"
            )
    thresholds = thresholds_of(document, info.class_names, threshold)
    check_writable(out, [Path(checkpoint)], what=what)

    exported_model: nn.Module = _HalfPrecision(copy.deepcopy(model)).eval() if half else model
    progress.status(f"exporting {info.encoder} to ONNX")
    graph = export_graph(exported_model, info.image_size, channels=len(info.mean), opset=opset)
    actual_opset = _opset_of(graph)
    if opset is not None and actual_opset != opset:
        raise DliError(
            f"--opset {opset}: the exporter could not convert the graph to it (it is at opset {actual_opset})"
        )
    metadata = _metadata(info, thresholds.values, thresholds.rule, stride, half, actual_opset)
    model_bytes = _with_metadata(graph, metadata)
    exported = OnnxModel(model_bytes, device="cpu", name="the export")
    if exported.metadata != metadata:
        raise DliError("the export's metadata does not read back as written")
    tolerance = HALF_TOLERANCE if half else TOLERANCE
    progress.status(f"checking the export against torch at {len(sizes)} input sizes and on images")
    checks = check_parity(model, exported, sizes) + check_image_parity(document, exported)
    worst = max(checks, key=lambda c: c.max_difference)
    if not worst.max_difference <= tolerance:
        raise DliError(
            "the export differs from the checkpoint: probabilities differ by up to "
            f"{worst.max_difference:.3g} at {worst.what} {'x'.join(map(str, worst.shape))} "
            f"(tolerance {tolerance:g}); nothing written"
        )
    try:
        atomic_write_bytes(out, model_bytes)
    except OSError as error:
        raise DliError(f"--out {out}: cannot write: {error.strerror or error}") from None
    return ExportResult(out, metadata, checks, tolerance)


def _metadata(
    info: ModelInfo, thresholds: Sequence[float], rule: str, stride: int, half: bool, opset: int
) -> OnnxMetadata:
    import dli

    return OnnxMetadata(
        class_names=tuple(info.class_names),
        input_channels=len(info.mean),
        mean=tuple(info.mean),
        std=tuple(info.std),
        image_size=info.image_size,
        input_stride=stride,
        thresholds=tuple(thresholds),
        threshold_rule=rule,
        encoder=info.encoder,
        precision="float16" if half else "float32",
        opset=opset,
        dli_version=dli.__version__,
        dli_commit=source_commit(),
        tiling=info.tiling,
        image_channels=info.channels,
        normalization=info.normalization,
        format_version=GRAY_FORMAT_VERSION if info.channels == 1 else FORMAT_VERSION,
        aspect=info.aspect,
        resize=info.resize,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--out", default=None, help="ONNX file; unset: <checkpoint stem>.onnx beside it")
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX operator set; unset: the exporter's default"
    )
    parser.add_argument(
        "--half",
        action="store_true",
        help=f"compute in float16 (input/output stay float32; tolerance {HALF_TOLERANCE:g})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="one threshold for every class in the metadata; "
        "unset: the checkpoint's calibrated ones (else 0.5)",
    )
    parser.add_argument(
        "--check-sizes",
        nargs=2,
        default=None,
        metavar="HxW",
        help="the two input sizes of the onnxruntime-vs-torch check; unset: the training size and "
        "one a stride taller and two wider",
    )


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(text) for text in args.check_sizes] if args.check_sizes else None
    result = export_onnx(
        args.checkpoint,
        args.out,
        opset=args.opset,
        half=args.half,
        threshold=args.threshold,
        check_sizes=sizes,
    )
    print(result.summary())
    return 0
