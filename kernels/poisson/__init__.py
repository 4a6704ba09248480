"""Poisson seamless cloning of a batch: the blend's entry point and its report (`blend`), windows and buckets
(`windows`), the preconditioned CG (`pcg`) and the direct sine-transform solve (`direct`)."""
