"""Benchmarks of coding_gym (run ``python -m benchmarks``)."""
