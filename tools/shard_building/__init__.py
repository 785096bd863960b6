"""The parts of tools/build_shards.py: where clips come from, how each is checked and prepared, how shards are
written."""
