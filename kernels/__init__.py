"""Injection kernels: one algorithm over two array modules (CuPy on the GPU, NumPy on the CPU)."""
