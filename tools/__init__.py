"""Command-line tools: shard building, checkpoint conversion, demo data, benchmarks."""
