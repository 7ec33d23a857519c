"""The benchmark package behind scripts/benchmark.py."""
