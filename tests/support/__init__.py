"""Helpers shared by the test suite and the benchmarks (real Redis servers on loopback)."""
