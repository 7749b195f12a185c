"""Benchmarks: ``python -m fastloc.bench <name>`` prints a table and writes JSON."""
