"""UNets of the paper (segmentation-models-pytorch + timm), by registry name.

The paper's lightweight "ℓ-" models cut the encoder after its third down-sampling stage
(`encoder_depth=3`, decoder channels 128/64/32), which keeps the encoders at 0.7M (ResNet-18),
0.3M (MobileOne-S1) and 1.6M (ResNeSt-50d) parameters. smp builds its own ResNet and MobileOne
encoders whole and only skips the deeper stages in `forward`; `build_model` deletes those
unused stages so that parameter counts, optimizer state and checkpoints hold only what runs.
Full-depth variants keep smp's defaults and are named by their smp or timm (`tu-`) names.

`decoder_convs=4` gives every decoder block four conv-BN-ReLU layers instead of smp's two, as the
reference implementation's vendored copy of smp has them (`--decoder-convs`, set by
`--protocol reference`): the two extra layers run after smp's second, at the block's width.

ImageNet weights come from the libraries' own loaders (Hugging Face Hub). Without network the
model starts from random init after one warning, and `PretrainedStatus` records what happened.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
from torch import nn

from dli.common.errors import DliError

DECODER_CONVS: tuple[int, ...] = (2, 4)
"""Conv-BN-ReLU layers per decoder block that `build_model` can build."""

PAPER_DECODER_CHANNELS: tuple[int, ...] = (128, 64, 32)
"""Decoder widths of the paper's ℓ-UNets (one per encoder stage at depth 3)."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one registered UNet.

    Attributes:
        smp_name: encoder name as smp takes it (`tu-<timm name>` for timm encoders).
        depth: number of encoder down-sampling stages the UNet uses.
        decoder_channels: one decoder width per stage (smp's defaults for full depth).
    """

    smp_name: str
    depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)


def _light(smp_name: str) -> EncoderSpec:
    return EncoderSpec(smp_name, depth=3, decoder_channels=PAPER_DECODER_CHANNELS)


ENCODERS: dict[str, EncoderSpec] = {
    # The paper's lightweight models.
    "l-resnet18": _light("resnet18"),
    "l-mobileone_s1": _light("mobileone_s1"),
    "l-resnest50d": _light("tu-resnest50d"),
    # Full-depth UNets with smp's default decoder.
    "resnet18": EncoderSpec("resnet18"),
    "resnet34": EncoderSpec("resnet34"),
    "resnet50": EncoderSpec("resnet50"),
    "mobileone_s1": EncoderSpec("mobileone_s1"),
    "tu-resnest50d": EncoderSpec("tu-resnest50d"),
}
"""Model names accepted by `build_model` (and `dli train --encoder`)."""


@dataclass(frozen=True)
class PretrainedStatus:
    """Where the encoder weights came from; saved in the run config.

    Attributes:
        requested: whether ImageNet weights were asked for.
        loaded: whether they were loaded (False: random init).
        detail: a short human-readable account (why loading failed, when it did).
    """

    requested: bool
    loaded: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable parameter counts of a UNet, by part."""

    encoder: int
    decoder: int
    head: int

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.head


def encoder_names() -> list[str]:
    """The registered model names, in registry order."""
    return list(ENCODERS)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry of `name`; `DliError` listing the valid names when unknown."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise DliError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}") from None


def build_model(
    encoder: str, num_classes: int, *, pretrained: bool = True, decoder_convs: int = 2
) -> tuple[nn.Module, PretrainedStatus]:
    """A UNet with `num_classes` output channels (logits, one sigmoid channel per defect class).

    With `pretrained`, the encoder starts from the library's ImageNet weights when they can be
    fetched (or are cached); otherwise from random init after a one-time warning.
    `decoder_convs` (2 or 4): conv-BN-ReLU layers per decoder block.
    """
    spec = encoder_spec(encoder)
    if num_classes < 1:
        raise DliError(f"a model needs at least one class, got num_classes={num_classes}")
    if decoder_convs not in DECODER_CONVS:
        raise DliError(f"decoder_convs {decoder_convs}: choose from {', '.join(map(str, DECODER_CONVS))}")
    model, status = _build_encoder_weights(spec, encoder, num_classes, pretrained)
    if decoder_convs == 4:
        _deepen_decoder(model)
    return model, status


def _build_encoder_weights(
    spec: EncoderSpec, encoder: str, num_classes: int, pretrained: bool
) -> tuple[nn.Module, PretrainedStatus]:
    if not pretrained:
        status = PretrainedStatus(requested=False, loaded=False, detail="random init (not requested)")
        return _build(spec, num_classes, weights=None), status
    # timm (`tu-`) encoders take a bool and name their weights by tag; smp's own take a tag.
    weights: str | bool = True if spec.smp_name.startswith("tu-") else "imagenet"
    offline = not _hub_reachable()
    try:
        with _hub_offline_mode(offline):
            model = _build(spec, num_classes, weights=weights)
    except Exception as error:  # hub, HTTP, cache and file errors: their types vary by library version
        if offline:
            reason = "the Hugging Face Hub is unreachable and the weights are not in its cache"
        else:
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            reason = f"{type(error).__name__}: {first_line}"
        _warn_once(f"ImageNet weights for {encoder} unavailable, training from random init: {reason}")
        status = PretrainedStatus(requested=True, loaded=False, detail=f"random init: {reason}")
        return _build(spec, num_classes, weights=None), status
    return model, PretrainedStatus(requested=True, loaded=True, detail=f"ImageNet weights of {spec.smp_name}")


def _deepen_decoder(model: nn.Module) -> None:
    """Give every decoder block two more conv-BN-ReLU layers after its second (4 in all)."""
    from segmentation_models_pytorch.base.modules import Conv2dReLU

    for block in model.decoder.blocks:
        width = block.conv2[0].out_channels
        extra = [Conv2dReLU(width, width, kernel_size=3, padding=1) for _ in range(2)]
        block.conv2 = nn.Sequential(block.conv2, *extra)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Encoder, decoder and segmentation-head parameter counts of an smp UNet."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return ParameterCounts(count(model.encoder), count(model.decoder), count(model.segmentation_head))


def _build(spec: EncoderSpec, num_classes: int, *, weights: str | bool | None) -> nn.Module:
    with warnings.catch_warnings():
        # smp warns that `tu-` encoders take a bool; we pass one, but older smp versions still warn.
        warnings.filterwarnings("ignore", message=".*encoder_weights.*should be set to True.*")
        model = smp.Unet(
            spec.smp_name,
            encoder_weights=weights,
            encoder_depth=spec.depth,
            decoder_channels=spec.decoder_channels,
            classes=num_classes,
        )
    _drop_unused_stages(model.encoder, spec.depth)
    return model


def _drop_unused_stages(encoder: nn.Module, depth: int) -> None:
    """Delete the encoder stages deeper than `depth` that smp builds but never runs.

    smp's own encoders report their stages by output stride (`get_stages()`: {16: [layer3],
    32: [layer4]} for ResNet); a depth-`d` encoder runs only strides up to 2**d. timm
    encoders are already built with `features_only` up to `depth` and have nothing to drop.
    """
    get_stages = getattr(encoder, "get_stages", None)
    if get_stages is None:
        return
    unused = {id(m) for stride, modules in get_stages().items() if stride > 2**depth for m in modules}
    for name, child in list(encoder.named_children()):
        if id(child) in unused:
            delattr(encoder, name)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within `timeout_s`.

    Without this check the Hub client retries a failing DNS lookup for 20-50 s before giving
    up. Behind a proxy the direct probe says nothing, so the libraries are left to try.
    """
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Switch the Hub client to cache-only mode (what `HF_HUB_OFFLINE=1` does) for the block.

    Cached weights still load; missing ones fail at once instead of after the client's retries.
    """
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True  # read at call time by `huggingface_hub.constants.is_offline_mode()`
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
