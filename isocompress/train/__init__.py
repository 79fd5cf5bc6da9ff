"""Training: trainable isotropic modules, restructuring a live network with its optimiser, neurogenesis."""
