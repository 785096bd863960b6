"""DALI pipelines that decode video shards (on the GPU when there is one) for MAE-ST training."""
