"""The paper's experiment grids as `dli experiment --preset NAME` documents.

Each preset is a grid document in the same form as a `--config` file (see `dli.experiments.grid`):
the factors to cross, plus `train` settings shared by every run. Flags given on the command
line override a preset's values. Settings a preset leaves out keep the `dli train` defaults,
which follow the paper (with `--data`: 1000 epochs, batch 64, 256 px, AdamW 5e-4).

The presets of the paper's experiments train under `--protocol reference` on the published
split (`--split reference`), so that their numbers compare with the paper's; `--protocols
dli` (or `reference,dli`) and `--split stratified` override them.
"""

from __future__ import annotations

from typing import Any

PAPER_SEEDS: list[int] = [0, 1, 2, 3, 4]
"""Five seeds, as the paper reports mean ± std over five runs (each also re-draws the split)."""

PAPER_ENCODERS: list[str] = ["l-resnet18", "l-mobileone_s1", "l-resnest50d"]
"""The paper's three lightweight UNet encoders (Table 1 columns)."""

PAPER_PROTOCOL: dict[str, Any] = {"protocols": ["reference"], "train": {"split": "reference"}}
"""What the paper's presets share: the reference protocol on the published split."""

PRESETS: dict[str, dict[str, Any]] = {
    # Table 1: every method on every encoder, all training data.
    "table1": {
        **PAPER_PROTOCOL,
        "methods": ["bce", "focal", "balanced", "wce", "dli"],
        "encoders": PAPER_ENCODERS,
        "seeds": PAPER_SEEDS,
        "fractions": [1.0],
    },
    # Table 2: DLI's injection (cut-paste only, mixed, Poisson only) x which free images are filled.
    "ablation": {
        **PAPER_PROTOCOL,
        "methods": ["dli"],
        "poisson_probs": [0.0, 0.5, 1.0],
        "fills": ["all-free", "until-uniform"],
        "encoders": ["l-resnet18"],
        "seeds": PAPER_SEEDS,
        "fractions": [1.0],
    },
    # Fig. 5: IoU as the labelled training data shrinks, with and without injection.
    "fractions": {
        **PAPER_PROTOCOL,
        "methods": ["bce", "dli"],
        "encoders": ["l-resnet18"],
        "seeds": PAPER_SEEDS,
        "fractions": [0.1, 0.25, 0.5, 0.75, 1.0],
    },
    # A few seconds per run on a CPU: checks the whole path (training, resume, aggregation).
    "smoke": {
        "methods": ["bce", "dli"],
        "encoders": ["l-resnet18"],
        "seeds": [0, 1],
        "fractions": [1.0],
        "synthetic_images": 40,
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "image_size": 64,
            "device": "cpu",
            "pretrained": False,
            "num_threads": 1,
            "progress": False,
        },
    },
}
"""Preset name -> grid document."""
