"""An exported dli model on onnxruntime: its metadata and its forward pass, without torch.

`dli export` writes an ONNX model whose input `images` is the normalized (N, C, H, W) float32
batch the checkpoint's model takes, and whose output `logits` is its (N, classes, H, W)
per-class logits; batch, height and width are dynamic (H and W multiples of `input_stride`).
What a deployment needs to feed it and read it is embedded in the model's `metadata_props`
(keys `dli.<field>` of `OnnxMetadata`, values JSON): class names, input channels, image
channels (1: a gray image repeated into the input channels, colour images converted to their
luma; 3: RGB), normalization mean/std and where they came from, the training image size and
resize mode, the per-class thresholds, and the dli version and commit that exported it. Gray
models are written as format version 1, which dli before colour support reads; RGB models as
version 2. Values
are range-checked when read (`dli.common.model_checks`, `dli.data.class_names`) and the graph's input
channels and output classes must match the metadata, so a bad file is one `DliError`, never a
traceback or a huge allocation.

`OnnxModel` runs such a file with onnxruntime and reproduces what `dli predict --checkpoint`
computes from an image read in its channels (`dli.data.imageio.read_image`): resize each
channel to the training size as the model was trained (`resize` in the metadata: antialiased
bilinear, Pillow's float filter, which is torch's `antialias=True`; or pixel-centre nearest),
scale to [0, 1], normalize, run, resize the logits back to the image's size (bilinear,
half-pixel centres, as torch's `align_corners=False`), sigmoid, and threshold per class. Only
NumPy, Pillow and onnxruntime are imported, so a production line can run it without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.common.model_checks import (
    check_image_size,
    check_normalization,
    check_resize,
    check_thresholds,
)
from dli.data.class_names import check_class_names
from dli.pipeline.tiling import Tiling

FORMAT = "dli-onnx"
FORMAT_VERSION = 2
"""The metadata version this dli reads and writes for RGB models (2 added `image_channels`)."""

GRAY_FORMAT_VERSION = 1
"""The metadata version of gray models: dli before colour support reads them."""

OPTIONAL_FIELDS: dict[str, object] = {
    "tiling": None,
    "image_channels": 1,
    "normalization": "magnetic-tile",
    "aspect": "stretch",
    "resize": "linear",
}
"""Metadata fields absent from older exports, and what they mean there."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "dli."


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported model carries besides its graph (see the module docstring).

    Attributes:
        class_names: defect classes, index = output channel.
        input_channels: channels of the input (3).
        mean, std: per-input-channel normalization of images scaled to [0, 1].
        image_size: square side the model was trained at (the side `dli predict` resizes to).
        input_stride: height and width must be multiples of it (the encoder's down-sampling).
        thresholds: per-class probability thresholds; threshold_rule says how they were chosen.
        encoder: the registry name of the model.
        precision: "float32" or "float16" (computation inside; inputs and outputs are float32).
        opset: the ONNX operator set of the graph.
        dli_version, dli_commit: the dli that exported it ("unknown" outside a git checkout).
        tiling: tile size, overlap, window and scale of a model trained on crops (`dli.pipeline.tiling`),
            which `dli predict --onnx` tiles by exactly as `--checkpoint` does; None (absent in
            files written before tiling) for a model trained on whole resized images.
        image_channels: 1 (gray images, repeated into the input channels; colour ones converted
            to their luma) or 3 (RGB).
        normalization: where mean/std came from (`dli.pipeline.normalization`).
        aspect: ``stretch`` or ``fit`` (`dli.models.checkpoint.ModelInfo.aspect`), as `preprocess` applies.
        resize: how images are resized to `image_size`, as in training: "linear" (antialiased
            bilinear) or "nearest" (pixel-centre nearest); "linear" in exports that predate it.
    """

    class_names: tuple[str, ...]
    input_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    input_stride: int
    thresholds: tuple[float, ...]
    threshold_rule: str
    encoder: str
    precision: str
    opset: int
    dli_version: str
    dli_commit: str
    tiling: Tiling | None = None
    image_channels: int = 1
    normalization: str = "magnetic-tile"
    aspect: str = "stretch"
    resize: str = "linear"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_props(self) -> dict[str, str]:
        """The `metadata_props` entries: `dli.<field>` -> JSON."""
        return {METADATA_PREFIX + name: json.dumps(value) for name, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> OnnxMetadata:
        """Inverse of `to_props`; `DliError` naming `source` when the entries are missing or bad."""
        if props.get(METADATA_PREFIX + "format") != json.dumps(FORMAT):
            raise DliError(f"{source} has no dli metadata (not written by dli export)")
        try:
            values = {
                f.name: json.loads(props[METADATA_PREFIX + f.name])
                if f.name not in OPTIONAL_FIELDS or METADATA_PREFIX + f.name in props
                else OPTIONAL_FIELDS[f.name]
                for f in fields(cls)
            }
            metadata = cls(
                class_names=check_class_names(values["class_names"], f"the dli metadata of {source}"),
                input_channels=int(values["input_channels"]),
                mean=tuple(float(v) for v in values["mean"]),
                std=tuple(float(v) for v in values["std"]),
                image_size=int(values["image_size"]),
                input_stride=int(values["input_stride"]),
                thresholds=tuple(float(v) for v in values["thresholds"]),
                threshold_rule=str(values["threshold_rule"]),
                encoder=str(values["encoder"]),
                precision=str(values["precision"]),
                opset=int(values["opset"]),
                dli_version=str(values["dli_version"]),
                dli_commit=str(values["dli_commit"]),
                tiling=Tiling.from_dict(values.get("tiling")),
                image_channels=int(values["image_channels"]),
                normalization=str(values["normalization"]),
                aspect=str(values["aspect"]),
                resize=str(values["resize"]),
                format=str(values["format"]),
                format_version=int(values["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DliError(
                f"{source} has incomplete dli metadata ({type(error).__name__}: {error})"
            ) from None
        if metadata.format_version > FORMAT_VERSION:
            raise DliError(
                f"{source} has dli metadata version {metadata.format_version}; "
                f"this dli reads <= {FORMAT_VERSION}"
            )
        if (
            len(metadata.thresholds) != len(metadata.class_names)
            or len(metadata.mean) != metadata.input_channels
            or metadata.image_channels not in (1, metadata.input_channels)
        ):
            raise DliError(f"{source} has inconsistent dli metadata (thresholds, classes or channels)")
        origin = f"the dli metadata of {source}"
        check_image_size(metadata.image_size, origin)
        check_normalization(metadata.mean, metadata.std, origin)
        check_thresholds(metadata.thresholds, origin)
        check_resize(metadata.resize, origin)
        if not 1 <= metadata.input_stride <= metadata.image_size:
            raise DliError(f"{origin}: input_stride {metadata.input_stride} is not in [1, image_size]")
        return metadata


def import_onnxruntime() -> Any:
    """The `onnxruntime` module; `DliError` saying how to install it when it is absent."""
    try:
        import onnxruntime
    except ImportError:
        raise DliError("onnxruntime is not installed (pip install 'dli[export]' or onnxruntime)") from None
    return onnxruntime


def providers_for(device: str) -> list[Any]:
    """onnxruntime execution providers for `--device` auto, cpu, cuda or cuda:N."""
    available = import_onnxruntime().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise DliError(
                f"--device {device}: onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
            )
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise DliError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


class OnnxModel:
    """An exported dli model, loaded into an onnxruntime session."""

    def __init__(self, model: str | Path | bytes, *, device: str = "cpu", name: str | None = None) -> None:
        ort = import_onnxruntime()

        self.name = name or ("model" if isinstance(model, bytes) else f"ONNX model {model}")
        if not isinstance(model, bytes):
            path = Path(model)
            if not path.is_file():
                raise DliError(f"ONNX model not found: {path}")
            model = str(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        providers = providers_for(device)  # its DliError is the message, not a load failure
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile, ... share no base
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise DliError(f"cannot load {self.name}: {type(error).__name__}: {first_line}") from None
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, self.name)
        self._check_graph_agrees()

    def _check_graph_agrees(self) -> None:
        """`DliError` unless the graph's input channels and output classes are those of the metadata."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise DliError(
                f"{self.name} has no {INPUT_NAME!r} input or {OUTPUT_NAME!r} output (not a dli export)"
            )
        expected = {
            "input channels": (inputs[INPUT_NAME], self.metadata.input_channels),
            "output classes": (outputs[OUTPUT_NAME], len(self.metadata.class_names)),
        }
        for what, (shape, wanted) in expected.items():
            actual = shape[1] if len(shape) == 4 else None
            if len(shape) != 4 or (isinstance(actual, int) and actual != wanted):
                raise DliError(
                    f"{self.name}: its graph has {what} {actual} (shape {shape}) "
                    f"where its dli metadata says {wanted}"
                )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """(N, classes, H, W) float32 logits of a normalized (N, C, H, W) float32 batch."""
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(inputs, np.float32)})
        return logits

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(C, S, S) float32 input for an (H, W, image_channels) or (H, W) image on [0, 255]:
        resized, scaled to [0, 1], normalized."""
        return preprocess(image, self.metadata)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image, its (classes, H, W) float32 probabilities at the image's own size."""
        logits = self.logits(np.stack([self.preprocess(image) for image in images]))
        size, aspect = self.metadata.image_size, self.metadata.aspect
        return [
            sigmoid(resize_bilinear(valid_region(lg, image.shape, size, aspect), image.shape[:2]))
            for lg, image in zip(logits, images, strict=True)
        ]


def resized_size(shape: tuple[int, ...], size: int, aspect: str) -> tuple[int, int]:
    """(h, w) an image of `shape` (H, W, ...) is resized to: (size, size) to stretch, else the longer
    side at `size` with the aspect ratio kept (``fit``; the rest of the square is padding)."""
    if aspect != "fit":
        return size, size
    height, width = shape[:2]
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def valid_region(logits: np.ndarray, shape: tuple[int, ...], size: int, aspect: str) -> np.ndarray:
    """The part of (C, size, size) `logits` that covers the image (all of it, unless ``fit`` padded)."""
    height, width = resized_size(shape, size, aspect)
    return logits[:, :height, :width]


def fit_pad_values(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(C,) float32 normalized value of ``fit``'s padding: the mean intensity averaged over the
    channels (what the DALI pipeline pads with), normalized per channel (0 for a gray model)."""
    mean_array, std_array = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return ((mean_array.mean() - mean_array) / std_array).astype(np.float32)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel of a pixel-centre nearest resize (torch's `nearest-exact`)."""
    scale = size_in / size_out
    return np.minimum(np.floor((np.arange(size_out) + 0.5) * scale).astype(np.int64), size_in - 1)


def preprocess(image: np.ndarray, metadata: OnnxMetadata) -> np.ndarray:
    """What `dli.predict.preprocess` computes, in NumPy and Pillow (one channel at a time), with
    the metadata's resize mode."""
    size = metadata.image_size
    height, width = resized_size(image.shape, size, metadata.aspect)
    pixels = image if image.ndim == 3 else image[..., None]
    if metadata.resize == "nearest":
        rows, columns = nearest_indices(pixels.shape[0], height), nearest_indices(pixels.shape[1], width)
        picked = pixels[np.ix_(rows, columns)].astype(np.float32) / np.float32(255.0)
        resized = np.ascontiguousarray(picked.transpose(2, 0, 1))
    else:
        resized = np.stack(
            [
                np.asarray(
                    Image.fromarray(
                        np.ascontiguousarray(pixels[..., c], dtype=np.float32) / np.float32(255.0)
                    ).resize((width, height), Image.Resampling.BILINEAR),
                    dtype=np.float32,
                )
                for c in range(pixels.shape[2])
            ]
        )
    mean = np.asarray(metadata.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(metadata.std, np.float32).reshape(-1, 1, 1)
    normalized = (resized - mean) / std
    if (height, width) == (size, size):
        return normalized
    # `fit`: padded at the bottom and right with the mean intensity, as in training.
    out = np.empty((normalized.shape[0], size, size), np.float32)
    out[...] = fit_pad_values(metadata.mean, metadata.std)[:, None, None]
    out[:, :height, :width] = normalized
    return out


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of linear interpolation with half-pixel centres, edges clamped."""
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight_high = source - low
    matrix = np.zeros((size_out, size_in), np.float64)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - weight_high)
    np.add.at(matrix, (rows, high), weight_high)
    return matrix.astype(np.float32)


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W) bilinear resize as torch's `interpolate(align_corners=False)`."""
    height, width = size
    rows = _interpolation_matrix(maps.shape[1], height)
    columns = _interpolation_matrix(maps.shape[2], width)
    return (rows @ maps.astype(np.float32) @ columns.T).astype(np.float32)


def sigmoid(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-values))).astype(np.float32)
