"""Benchmarks of Tally: run `python -m bench.run --help`."""
