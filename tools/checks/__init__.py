"""The checks tools/preflight.py runs."""
