"""Training: the plain loop, optimizers, early stopping, checkpoint state."""
