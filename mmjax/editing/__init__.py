"""Editing by optimisation: pure functions over callables and arrays (no families)."""
