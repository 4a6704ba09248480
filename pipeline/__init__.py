"""Data path: manifest -> split -> DLI plan -> DALI decode/augment -> injection -> batch."""
