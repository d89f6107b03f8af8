"""Benchmarks on an emulated edge testbed: `flowspec bench` (see flowspec.bench.command)."""
