"""Benchmarks (not tests): each script prints a report and writes JSON + markdown."""
