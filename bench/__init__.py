"""Benchmarks: throughput of the data path, the kernels and training (never asserted by tests)."""
