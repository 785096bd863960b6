"""DALI pipelines that decode video shards (on the GPU when there is one) for MAE-ST training and evaluation."""

from dali_pipes.loader import VideoLoader, build_eval_loader, build_finetune_loader, build_pretrain_loader

__all__ = ["VideoLoader", "build_eval_loader", "build_finetune_loader", "build_pretrain_loader"]
