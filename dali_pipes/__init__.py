"""DALI pipelines that decode video shards (on the GPU when there is one) for MAE-ST training and evaluation.

The loaders are imported on first use, so that the package's plain-Python parts (shard format, sampling, the
decoders' choice) can be used without starting DALI: a process that merely imports DALI and is then forked or
spawned as a DataLoader worker was seen to abort ("terminate called without an active exception", 1 run in 6)."""

from dali_pipes.config import LoaderConfig
from dali_pipes.sampling import EvalViews, TrainViews, ViewSpec

_LOADERS = ("VideoLoader", "build_eval_loader", "build_pretrain_loader")
__all__ = ["EvalViews", "LoaderConfig", "TrainViews", "ViewSpec", *_LOADERS]


def __getattr__(name):
    if name in _LOADERS:
        from dali_pipes import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dali_pipes' has no attribute {name!r}")
