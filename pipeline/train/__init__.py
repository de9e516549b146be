"""Training: the loop, optimizer, batches, distributed wrapping, checkpoints, SAM, MFU."""
