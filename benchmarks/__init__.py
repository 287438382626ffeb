"""Benchmark programs (run as ``python benchmarks/<name>.py``) and the statistics they share."""
