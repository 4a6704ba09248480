"""Shared utilities of every layer: one-line user errors, atomic writes, run-folder locks,
checks of a model's metadata and progress output. Imports nothing else of dli."""
