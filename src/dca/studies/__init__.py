"""Studies around the method: the demo, the speed benchmark and the step-0 study of latent mappings."""
