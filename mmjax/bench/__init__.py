"""Benchmark harness: `python -m mmjax.bench` (see __main__.py)."""
