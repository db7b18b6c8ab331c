"""Test helpers that ship with the package: a fake upstream for tests, demos and benchmarks."""
