"""Does pretraining still make a better encoder? The demo's pretrained encoder against random initializations of
the same model, frozen, on the linear probe of their pooled features (the labels of the demo's pretraining split ->
its 144 val videos): the pretrained one must beat the best random one by more than its 95% interval's half-width.

It needs a pretraining as long as the effect needs (120 epochs, about 11 minutes on 2 cores), so it is not in the
default suite: `make demo-learns` runs it on its own run (MAE_ST_LEARNED_RUN, MAE_ST_DEMO_DATA); `pytest -m learning`
alone builds the demo data and pretrains first."""

import os

import pytest
import torch

from dali_pipes import EvalViews, LoaderConfig, VideoLoader, ViewSpec
from models.config import VideoViTConfig
from models.encoder import VideoViT
from trainer.features import FINAL, load_encoder, view_features
from trainer.probes import linear, score
from trainer.recipes import DEMO_ENCODER, DEMO_FRAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_run(tmp_path) -> tuple[str, str]:
    """(a finished 120-epoch demo_PT run folder, the demo's shards): the ones named in the environment, or new."""
    run, data = os.environ.get("MAE_ST_LEARNED_RUN"), os.environ.get("MAE_ST_DEMO_DATA")
    if run and data:
        return run, data
    from tools import make_demo_data
    from trainer import pretrain

    assert make_demo_data.main(["--out", str(tmp_path / "demo")]) == 0
    data, run = str(tmp_path / "demo" / "shards"), str(tmp_path / "pretrain")
    assert pretrain.main(pretrain.Pretraining, ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe",
                                                "demo_PT", "--data", data, "--output", run, "epochs=120",
                                                "warmup_epochs=5", "probe_every=0", "checkpoint_every=0"]) == 0
    return run, data


def pooled(encoder, data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled final features [V, D], labels [V]) of one centred view per video of `split`."""
    spec = ViewSpec(**DEMO_FRAMES, repeats=1, flip=False)
    loader = VideoLoader(LoaderConfig(data, EvalViews(spec, 1, 1), split=split, batch_size=16))
    features, labels = [], []
    for batch in loader:
        keep = batch["video_index"] >= 0
        features.append(view_features(encoder, batch["video"][keep], [FINAL])[f"{FINAL}.mean"])
        labels.append(batch["label"][keep])
    loader.close()
    return torch.cat(features), torch.cat(labels)


@pytest.mark.learning
def test_the_pretrained_encoder_beats_random_ones_beyond_the_noise_of_its_queries(tmp_path):
    run, data = demo_run(tmp_path)
    encoders = {"pretrained": load_encoder(run)}
    for seed in range(3):
        torch.manual_seed(seed)
        encoders[f"random {seed}"] = VideoViT(VideoViTConfig(**DEMO_ENCODER)).eval()
    found = {}
    for name, encoder in encoders.items():
        (train, train_labels), (test, test_labels) = pooled(encoder, data, "pretrain"), pooled(encoder, data, "val")
        classes = 1 + int(max(train_labels.max(), test_labels.max()))
        found[name] = score(linear(train, train_labels, test, classes), test_labels)
    pretrained, best_random = found.pop("pretrained"), max(s["top1"] for s in found.values())
    low, high = pretrained["top1_interval"]
    assert pretrained["queries"] == 144
    assert pretrained["top1"] - best_random > (high - low) / 2, (pretrained, found)
