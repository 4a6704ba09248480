"""Poisson seamless cloning of a batch: the blend's entry point, windows and buckets, the
preconditioned CG, the direct sine-transform solve and the report of a solve."""
