"""Training a coprocessor: data (packing, insertion points), the training loop, checkpoints and run identity."""
