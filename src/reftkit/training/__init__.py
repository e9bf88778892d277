"""Training infrastructure: the accelerator, optimiser, metrics, run directories, checkpoints and the run loop."""
