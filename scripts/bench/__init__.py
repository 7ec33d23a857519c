"""The benchmark package behind scripts/benchmark.py: the development set, the Slicer peer methods and the harness."""
