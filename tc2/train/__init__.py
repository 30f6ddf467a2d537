"""The run around the train step: the fit loop, train-state checkpoints, batches, plots."""
