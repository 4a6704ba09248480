"""Checkpoints: atomic writes, safe loads, and everything needed to resume a run exactly.

A checkpoint is a plain dict of tensors and primitive containers, so it loads with
`torch.load(weights_only=True)` (no arbitrary code runs when a checkpoint is opened). It is
written to a temp file and renamed into place, so a run killed mid-save keeps the previous one.
RNG states (torch CPU and CUDA, NumPy, Python) are stored as tensors and primitives.

Everything a checkpoint holds (weights, model info, thresholds, config, optimizer, scaler and
RNG states, metrics) is covered by one SHA-256 (`content_checksum`, under `CONTENT_CHECKSUM_KEY`)
that every load verifies, so a corrupted byte anywhere is refused rather than used. Checkpoints
of format version 1 carry only the weights' checksum (`CHECKSUM_KEY`), still verified. A model
whose weights are not finite is never saved, and `model_from_checkpoint` refuses one. Values
that drive allocations or decisions (image size, normalization, class names, thresholds) are
range-checked when read (`dli.common.model_checks`, `dli.data.class_names`).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dli.common.atomic import atomic_save
from dli.common.errors import DliError
from dli.common.model_checks import check_image_size, check_normalization, check_resize
from dli.data.class_names import check_class_names
from dli.pipeline.tiling import Tiling

FORMAT = "dli-checkpoint"
VERSION = 2
"""2: a checksum over the whole document (`CONTENT_CHECKSUM_KEY`); 1: over the weights only."""
REQUIRED_KEYS: tuple[str, ...] = ("model", "model_info", "config")
"""Keys every dli checkpoint holds (training checkpoints hold more: optimizer, RNG, ...)."""

CHECKSUM_KEY = "model_sha256"
"""Key of the weights' checksum (`weights_checksum` of the "model" state dict)."""

CONTENT_CHECKSUM_KEY = "content_sha256"
"""Key of the checksum of everything else in the document (`content_checksum`)."""


def weights_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 over a state dict's tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_value(digest: Any, value: Any) -> None:
    """Feed `value` (nested dicts, lists, tuples, tensors, primitives) into `digest`, unambiguously."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _digest_value(digest, key)
            _digest_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _digest_value(digest, item)
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)}:".encode() + encoded)
    else:  # None, bool, int, and anything else torch.load(weights_only=True) returns
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_checksum(document: Mapping[str, Any]) -> str:
    """SHA-256 over every entry of a checkpoint document but the checksums themselves."""
    digest = hashlib.sha256()
    _digest_value(
        digest, {k: v for k, v in document.items() if k not in (CONTENT_CHECKSUM_KEY, CHECKSUM_KEY)}
    )
    return digest.hexdigest()


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]


def _non_finite_summary(state: Mapping[str, Any], names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} of {len(state)} weight tensors are not finite ({shown})"


@dataclass(frozen=True)
class ModelInfo:
    """What it takes to rebuild a trained model and feed it like training did.

    Attributes:
        encoder: registry name (`dli.models.unet.ENCODERS`).
        class_names: defect classes, index = output channel.
        image_size: square input side the model was trained at.
        mean, std: normalization of each of the model's 3 input channels, applied to images
            scaled to [0, 1] (equal in all three for a gray model).
        decoder_convs: conv-BN-ReLU layers per decoder block (2, or 4 as in the reference).
        resize: how images were resized in training (``linear`` or ``nearest``).
        tiling: how the model predicts a whole image when it was trained on crops (tile size =
            crop size, overlap, window, scale); None for a model trained on whole resized images.
        channels: image channels the model was trained on: 1 (gray, repeated into the 3 input
            channels; colour images converted to luma) or 3 (RGB). Checkpoints written before
            colour support are gray.
        normalization: where `mean`/`std` came from (`dli.pipeline.normalization`); checkpoints
            written before it was a setting used Magnetic Tile's.
        aspect: ``stretch`` (images squeezed to the square) or ``fit`` (aspect ratio kept, longer
            side = image_size, padded at the bottom and right with the mean intensity).
    """

    encoder: str
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decoder_convs: int = 2
    resize: str = "linear"
    tiling: Tiling | None = None
    channels: int = 1
    normalization: str = "magnetic-tile"
    aspect: str = "stretch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        """The info of a checkpoint's `model_info`; `DliError` for names or values out of range."""
        from dli.pipeline.normalization import model_statistics

        origin = "the checkpoint's model_info"
        channels = int(data.get("channels", 1))
        if channels not in (1, 3):
            raise ValueError(f"channels {channels}: expected 1 or 3")
        mean, std = model_statistics(data["mean"], data["std"], channels)  # one value: all channels
        info = cls(
            encoder=str(data["encoder"]),
            class_names=check_class_names(data["class_names"], origin),
            image_size=check_image_size(data["image_size"], origin),
            mean=mean,
            std=std,
            decoder_convs=int(data.get("decoder_convs", 2)),
            resize=str(data.get("resize", "linear")),
            tiling=Tiling.from_dict(data.get("tiling")),
            channels=channels,
            normalization=str(data.get("normalization", "magnetic-tile")),
            aspect=str(data.get("aspect", "stretch")),
        )
        check_normalization(info.mean, info.std, origin)
        check_resize(info.resize, origin)
        return info


def model_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model of a checkpoint (a path, or a dict from `load_checkpoint`), in eval mode."""
    from dli.models.unet import build_model

    if isinstance(checkpoint, Mapping):
        document, name = checkpoint, "checkpoint"
    else:
        document, name = load_checkpoint(checkpoint), f"checkpoint {checkpoint}"
    try:
        info = ModelInfo.from_dict(document["model_info"])
        bad = non_finite_tensors(document["model"])
        if bad:
            raise DliError(f"{_non_finite_summary(document['model'], bad)}: the run that wrote it diverged")
        model, _ = build_model(
            info.encoder, len(info.class_names), pretrained=False, decoder_convs=info.decoder_convs
        )
        model.load_state_dict(document["model"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, DliError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DliError(f"{name} does not hold a usable model: {first_line}") from None
    return model.to(device).eval(), info


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` and `DistributedDataParallel` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` (plus format tags and the weights' checksum) to `path` atomically.

    `DliError` (nothing written) when the model's weights are not finite.
    """
    stale = (CHECKSUM_KEY, CONTENT_CHECKSUM_KEY)  # a payload read from a checkpoint carries its old ones
    document = {**{k: v for k, v in payload.items() if k not in stale}, "format": FORMAT, "version": VERSION}
    if "model" in payload:
        bad = non_finite_tensors(payload["model"])
        if bad:
            raise DliError(f"not writing {path}: {_non_finite_summary(payload['model'], bad)}")
        document[CHECKSUM_KEY] = weights_checksum(payload["model"])
    document[CONTENT_CHECKSUM_KEY] = content_checksum(document)
    atomic_save(path, lambda handle: torch.save(document, handle))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dli checkpoint with `weights_only=True`; `DliError` naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DliError(f"checkpoint not found: {path}")
    try:
        document = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError, BadZipFile, ... and, from the legacy reader, anything
        kind = type(error).__name__
        raise DliError(
            f"cannot read checkpoint {path}: corrupt, truncated or not a PyTorch file ({kind})"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise DliError(f"not a dli checkpoint: {path}")
    version = document.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise DliError(f"checkpoint {path} has format version {version!r}; this dli reads <= {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise DliError(f"checkpoint {path} lacks {', '.join(missing)}")
    stored = document.get(CHECKSUM_KEY)  # absent in checkpoints written before checksums
    if stored is not None and (
        not isinstance(document["model"], Mapping) or weights_checksum(document["model"]) != stored
    ):
        raise DliError(f"checkpoint {path} is corrupt: its weights do not match their checksum")
    if version >= 2 and document.get(CONTENT_CHECKSUM_KEY) != content_checksum(document):
        raise DliError(f"checkpoint {path} is corrupt: its contents do not match their checksum")
    return document


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), NumPy and Python RNG states, as tensors/primitives."""
    version, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002 - the global RNG itself
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": version,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - the global RNG itself
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The required `--checkpoint` flag of the commands that read a trained model (eval, export)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        default=argparse.SUPPRESS,
        help="a best.pt or last.pt written by dli train",
    )
