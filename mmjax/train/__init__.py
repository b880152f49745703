"""Training: state, the shared step, the loop."""
