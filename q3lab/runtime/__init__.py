"""Runtime layer: the model as a specification over one layer step, experts, residency, recording."""
