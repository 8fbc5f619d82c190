"""Code generated from protos/ by scripts/generate.py. Do not edit."""
