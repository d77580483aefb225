"""Benchmarks: `make bench-prep`, `make bench-loader`, `make bench-train`."""
