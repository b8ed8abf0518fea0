"""Benchmarks: the suite (``python -m benchmarks.suite``), its workloads and variants."""
