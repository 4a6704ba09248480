"""What `dli train` runs on: the run configuration, the run's datasets, the Trainer and its
optimisation step, the run folder, several processes, and the run's pictures."""
