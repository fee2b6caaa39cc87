"""Benchmarks (run as scripts) and the code only they use, with its tests in bench/tests."""
