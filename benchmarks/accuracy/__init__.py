"""The her2st accuracy benchmark (entry point: benchmarks/her2st_accuracy.py)."""
