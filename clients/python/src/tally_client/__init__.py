"""Tally's Python client."""
