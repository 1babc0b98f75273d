"""Benchmarks and measurement scripts: run from the repository root (python -m bench.<name>); not installed."""
