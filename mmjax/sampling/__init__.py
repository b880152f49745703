"""Diffusion noise schedules, samplers and editing primitives (see schedules.py, samplers.py)."""
