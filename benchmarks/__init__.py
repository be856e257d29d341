"""Benchmarks for safegrad_kernels (not part of the installed package)."""
