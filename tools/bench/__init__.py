"""The throughput benchmark's measurements (tools/benchmark.py runs them), the loaders it compares against, and the
GPU projection."""
