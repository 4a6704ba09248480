"""The UNet registry: the paper's ℓ-models, their parameter counts, and pretrained fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from dli.common.errors import DliError
from dli.models import unet
from dli.models.unet import ENCODERS, build_model, count_parameters

# The paper quotes 0.7M / 0.3M / 1.6M encoder parameters; these are the exact counts.
PAPER_ENCODER_PARAMETERS = {"l-resnet18": 683_072, "l-mobileone_s1": 325_632, "l-resnest50d": 1_584_768}


@pytest.mark.parametrize("name", list(PAPER_ENCODER_PARAMETERS))
def test_light_unets_have_the_paper_encoder_size_and_train_every_parameter(name):
    model, status = build_model(name, num_classes=5, pretrained=False)
    counts = count_parameters(model)
    assert counts.encoder == PAPER_ENCODER_PARAMETERS[name]
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert not status.requested and not status.loaded

    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5, 64, 64)
    logits.square().mean().backward()
    # The unused deep stages are gone: every remaining parameter takes part in the forward pass.
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_full_depth_variant_keeps_its_deep_stages():
    model, _ = build_model("resnet18", num_classes=3, pretrained=False)
    assert count_parameters(model).encoder == 11_176_512  # torchvision's resnet18 without fc
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(DliError) as error:
        build_model("l-resnet19", num_classes=5, pretrained=False)
    message = str(error.value)
    assert "l-resnet19" in message
    assert all(name in message for name in ENCODERS)


def test_unavailable_weights_warn_once_and_fall_back_to_random_init(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(unet, "_hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(unet, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, status = build_model("l-resnet18", num_classes=2, pretrained=True)
        build_model("l-resnet18", num_classes=2, pretrained=True)
    assert status.requested and not status.loaded
    assert "unreachable" in status.detail
    relevant = [w for w in caught if "ImageNet weights" in str(w.message)]
    assert len(relevant) == 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)
