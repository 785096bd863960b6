"""Something-Something v2: the official label files, segment sampling, no flips, and a demo whose mirrored pair of
classes (left to right / right to left) is learned."""

import json
import os

import numpy as np
import pytest
import torch

from dali_pipes.sampling import EvalViews, TrainViews, ViewSpec, segment_indices
from tools.shard_building.video_sources import from_ssv2, read_ssv2_labels, ssv2_class
from trainer import finetune
from trainer.recipes import FINETUNE_RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_layout(folder):
    """Label files as released: string indices, bracketed templates with placeholders, test ids without labels."""
    folder.mkdir(exist_ok=True)
    (folder / "something-something-v2-labels.json").write_text(json.dumps(
        {"Holding something next to something": "41", "Pushing something from left to right": "93",
         "Pushing something from right to left": "94"}))
    (folder / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "42326", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]}]))
    (folder / "something-something-v2-validation.json").write_text(json.dumps([
        {"id": "74225", "label": "pushing pen from right to left", "template": "Pushing [something] from right to left",
         "placeholders": ["pen"]}]))
    (folder / "something-something-v2-test.json").write_text(json.dumps([{"id": "1420"}, {"id": "77"}]))
    return str(folder)


def test_the_official_label_files_are_read_as_released(tmp_path):
    labels = official_layout(tmp_path / "labels")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "78687.webm").write_bytes(b"x")
    assert ssv2_class("Holding [something] next to [something]") == "Holding something next to something"
    assert read_ssv2_labels(labels) == {"Holding something next to something": 41,
                                        "Pushing something from left to right": 93,
                                        "Pushing something from right to left": 94}
    sources = {s.key: s for s in from_ssv2(labels, str(videos))}
    assert set(sources) == {"78687", "42326", "74225", "1420", "77"}
    assert sources["78687"].label == "Holding something next to something" and sources["78687"].split == "train"
    assert sources["78687"].path == str(videos / "78687.webm") and sources["42326"].path is None  # not downloaded
    assert sources["74225"].split == "val" and sources["1420"].split == "test" and sources["1420"].label is None
    bad = tmp_path / "bad"
    official_layout(bad)
    (bad / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "5", "template": "Juggling [something]", "placeholders": ["balls"]}]))
    with pytest.raises(ValueError, match="'Juggling something' is not in something-something-v2-labels.json"):
        from_ssv2(str(bad), str(videos))


def test_segment_sampling_covers_the_clip():
    rng = np.random.default_rng(0)
    total, frames = 48, 16
    draws = np.stack([segment_indices(total, frames, rng.random(frames)) for _ in range(2000)])
    assert draws.min() == 0 and draws.max() == total - 1  # the first and the last segment are drawn from
    for i in range(frames):  # each pick stays inside its own segment, and reaches all of it
        assert set(draws[:, i]) == set(range(i * 3, i * 3 + 3))
    spec = ViewSpec(num_frames=frames, sampling="segments", repeats=2, per_view_start=True, flip=False)
    meta = {"num_frames": total, "fps_milli": 12000, "height": 240, "width": 320}
    first, again = (TrainViews(spec).plan(meta, np.random.default_rng([7, 0, 3, 5])) for _ in range(2))
    assert np.array_equal(first.frames, again.frames)  # deterministic given (seed, rank, epoch, batch)
    assert first.flips == [0, 0]
    test = EvalViews(ViewSpec(num_frames=frames, sampling="segments", repeats=1, flip=False), clips=2, crops=3)
    plan = test.plan(meta, None)
    clips = [plan.frames[plan.orders[k * 3]] for k in range(2)]
    assert clips[0].tolist() == list(range(0, 48, 3)) and clips[1].tolist() == list(range(2, 48, 3))  # 1/4, 3/4
    short = segment_indices(5, 16, np.full(16, 0.5))  # a clip shorter than 16 frames repeats frames
    assert short.min() == 0 and short.max() == 4 and np.all(np.diff(short) >= 0)


def test_the_ssv2_recipes_never_flip():
    from trainer.data import loader_config

    for name in ("ssv2_VIT_B_16x2_FT", "ssv2_VIT_L_16x2_FT", "demo_ssv2_FT"):
        recipe = FINETUNE_RECIPES[name]
        assert not recipe.views.flip and recipe.views.sampling == "segments"
        assert (recipe.evaluation.eval_clips, recipe.evaluation.eval_crops) == (2, 3)
    env = type("Env", (), {"rank": 0, "world_size": 1, "local_world_size": 1, "device": "cpu"})()
    config = loader_config(FINETUNE_RECIPES["demo_ssv2_FT"], "unused", env, 4, torch.float32)
    assert config.views.spec.flip is False and config.views.spec.sampling == "segments"
    rng = np.random.default_rng(0)
    meta = {"num_frames": 40, "fps_milli": 12000, "height": 96, "width": 128}
    assert all(f == 0 for _ in range(200) for f in config.views.plan(meta, rng).flips)


@pytest.mark.long
def test_the_demo_tells_the_mirrored_pair_apart(tmp_path):
    """The SSv2-shaped demo from scratch (no pretraining, a short run): left-to-right and right-to-left, mirror images
    of each other, are told apart above chance (a model trained with flips sees them as one class)."""
    from tools import make_ssv2_demo

    out = tmp_path / "ssv2"
    assert make_ssv2_demo.main(["--out", str(out), "--train-per-class", "10", "--val-per-class", "4", "--test", "2",
                                "--workers", "2"]) == 0
    manifest = json.load(open(out / "shards" / "manifest.json"))
    assert manifest["label_map"] == {"Pushing something from left to right": 0,
                                     "Pushing something from right to left": 1, "Moving something up": 2,
                                     "Moving something down": 3}
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 40, "val": 16, "test": 2}
    assert manifest["splits"]["train"]["codecs"] == {"vp9": 40}
    run = tmp_path / "run"
    assert finetune.main(finetune.Finetuning, ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
                                               "--recipe", "demo_ssv2_FT", "--data", str(out / "shards"), "--output",
                                               str(run), "epochs=25", "evaluation.eval_every=0"]) == 0
    per_class = json.load(open(run / "eval.json"))["per_class"]
    pair = [per_class[name]["top1"] for name in make_ssv2_demo.MIRRORED_PAIR]
    assert sum(pair) / 2 > 50, per_class  # chance within the pair: 50%
