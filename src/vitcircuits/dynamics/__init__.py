"""Training dynamics: when heads and circuits form, read off a series of checkpoints."""
