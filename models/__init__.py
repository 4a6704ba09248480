"""Models, losses and metrics of the paper."""
