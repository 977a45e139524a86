"""Benchmarks: each ``bench_*.py`` module prints its figures and their ratio against the reference of its issue."""
