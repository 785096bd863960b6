"""Using a trained encoder: features extracted through the loader's views (equal to the model's own forward, resumed
after a kill without redoing finished videos), probes with their intervals, the weights anyone opens (safetensors
round trip, torch.hub), and the options of the tools."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_shards, once_per_run
from dali_pipes import EvalViews, LoaderConfig, VideoLoader, ViewSpec
from models import build_classifier, build_pretrain_model, from_pretrained, save_pretrained
from models.checkpoints import from_ours
from models.hub import encoder_of
from tools import extract_features, probe
from trainer.checkpointing import write_checkpoint
from trainer.features import load_encoder
from trainer.probes import attentive, interval, knn, linear, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, num_frames=4, pred_t_dim=2, depth=2, embed_dim=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(once_per_run(tmp_path_factory, "features", lambda f: make_shards(f, n=6, frames=40)) / "shards")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pretraining model, written as an mae_st file (what a user brings)."""
    torch.manual_seed(0)
    model = build_pretrain_model("vit_tiny", **TINY)
    path = str(tmp_path_factory.mktemp("model") / "tiny_mae_st.pth")
    write_checkpoint(from_ours(model.state_dict(), "mae_st"), path, "mae_st")
    return path, model


def extract(shards, checkpoint, out, *extra):
    return extract_features.main(["--checkpoint", checkpoint, "--data", shards, "--split", "train", "--out", str(out),
                                  "--stride", "2", "--target-fps", "0", "--batch-size", "2", *extra])


def test_extracted_features_are_the_models_own_forward_on_the_same_views(shards, checkpoint, tmp_path):
    path, model = checkpoint
    assert extract(shards, path, tmp_path / "f", "--blocks", "1", "final", "--tokens", "--clips", "2") == 0
    features = load_file(str(tmp_path / "f" / "features.safetensors"))
    index = json.load(open(tmp_path / "f" / "index.json"))
    manifest = json.load(open(tmp_path / "f" / "manifest.json"))
    assert manifest["videos"] == 6 and manifest["views"] == len(index) == 12 and manifest["blocks"] == ["block1", "final"]
    assert features["final.mean"].shape == (12, 64) and features["block1.tokens"].shape == (12, 32, 64)
    assert features["block1.tokens"].dtype == torch.float16 and sorted({r["clip"] for r in index}) == [0, 1]
    # the same views through the model itself: its encoder on every token, the final norm, the patch tokens' mean
    views = EvalViews(ViewSpec(num_frames=4, stride=2, target_fps=None, crop_size=32, repeats=1, flip=False), 2, 1)
    loader = VideoLoader(LoaderConfig(shards, views, split="train", batch_size=2))
    model.eval()
    expected = []
    with torch.no_grad():
        for batch in loader:
            keep = batch["video_index"] >= 0
            tokens = model.norm(model.encode(model.embed(batch["video"][keep])))
            expected.append(tokens[:, 1:].mean(1))
            assert [r["label"] for r in index[sum(map(len, expected[:-1])):][:len(expected[-1])]] == \
                batch["label"][keep].tolist()
    loader.close()
    assert torch.equal(torch.cat(expected), features["final.mean"])
    assert {r["start_frame"] for r in index} == {0, 40 - 7}  # (the 2 clips: first and last start of a 7-frame span)


def test_a_killed_extraction_goes_on_after_its_last_whole_part(shards, checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    assert extract(shards, path, tmp_path / "whole", "--part-batches", "1") == 0
    computed = []
    real = extract_features.view_features

    def counting(encoder, video, names, tokens=False):
        computed.append(len(video))
        return real(encoder, video, names, tokens)

    def killed_after_two(parts, rank, number, *args):
        if number == 2:
            raise KeyboardInterrupt("killed")
        real_write(parts, rank, number, *args)

    real_write = extract_features.write_part
    monkeypatch.setattr(extract_features, "view_features", counting)
    monkeypatch.setattr(extract_features, "write_part", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(shards, path, tmp_path / "killed", "--part-batches", "1")
    assert computed == [2, 2, 2]  # three batches computed, two parts whole
    monkeypatch.setattr(extract_features, "write_part", real_write)
    computed.clear()
    assert extract(shards, path, tmp_path / "killed", "--part-batches", "1") == 0
    assert computed == [2]  # only the batch whose part was not written
    whole, resumed = (load_file(str(tmp_path / f / "features.safetensors")) for f in ("whole", "killed"))
    assert torch.equal(whole["final.mean"], resumed["final.mean"])
    assert json.load(open(tmp_path / "whole" / "index.json")) == json.load(open(tmp_path / "killed" / "index.json"))
    assert not os.path.exists(tmp_path / "killed" / extract_features.PARTS)


def test_probes_on_cached_features_with_their_intervals(shards, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert extract(shards, path, tmp_path / "f", "--blocks", "final", "--tokens") == 0
    assert probe.main(["--train", str(tmp_path / "f"), "--test", str(tmp_path / "f"), "--json",
                       str(tmp_path / "p.json")]) == 0
    results = {(r["probe"], r["block"]): r for r in json.load(open(tmp_path / "p.json"))["results"]}
    assert set(results) == {(p, "final") for p in ("attentive", "knn", "linear")}
    assert results["knn", "final"]["top1"] == 100.0 and results["knn", "final"]["queries"] == 6  # (itself)
    assert "top1 100.00 (95%: 61.0-100.0, 6 videos)" in capsys.readouterr().out
    # the probes themselves: separable features are found, an interval is the number of queries' own
    torch.manual_seed(0)
    labels = torch.arange(4).repeat(30)
    features = torch.nn.functional.one_hot(labels, 16).float() * 3 + torch.randn(120, 16) * 0.3
    for fit in (knn, linear):
        assert score(fit(features[:80], labels[:80], features[80:], 4), labels[80:])["top1"] == 100.0
    grids = features[:, None, :].expand(-1, 5, -1).contiguous()
    assert score(attentive(grids[:80], labels[:80], grids[80:], 4, epochs=40), labels[80:])["top1"] == 100.0
    assert interval(72, 144) == (41.9, 58.1) and interval(8, 16) == (28.0, 72.0)  # (16 queries: +-22 points)


def test_exported_weights_open_without_the_trainer_exactly(tmp_path, checkpoint):
    _, model = checkpoint
    encoder = encoder_of(model)
    save_pretrained(encoder, str(tmp_path / "encoder"))
    opened = from_pretrained(str(tmp_path / "encoder"))
    assert type(opened).__name__ == "VideoViT" and opened.cfg == encoder.cfg
    for (name, a), (_, b) in zip(encoder.state_dict().items(), opened.state_dict().items()):
        assert torch.equal(a, b), name
    classifier = build_classifier("vit_tiny", num_classes=5, img_size=32, num_frames=4)
    save_pretrained(classifier, str(tmp_path / "classifier"))
    hub = torch.hub.load(ROOT, "from_pretrained", str(tmp_path / "classifier"), source="local")
    video = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(hub(video), classifier.eval()(video))
    assert torch.equal(load_encoder(str(tmp_path / "encoder")).encode(encoder.embed(video)),
                       encoder.encode(encoder.embed(video)))


def test_the_tools_options_are_checked(shards, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit):
        extract(shards, path, tmp_path / "f", "--windows", "3")  # without --window-stride
    assert "--windows and --window-stride go together" in capsys.readouterr().err
    assert extract(shards, path, tmp_path / "f", "--blocks", "7") == 2
    assert "this encoder has blocks 1-2, or 'final'" in capsys.readouterr().err
    assert probe.main(["--train", str(tmp_path / "nothing"), "--test", str(tmp_path / "nothing")]) == 2
    assert "has no features.safetensors: write it with tools/extract_features.py" in capsys.readouterr().err
    from trainer.recipes import PRETRAIN_RECIPES, resolve_recipe

    with pytest.raises(ValueError, match=r"probe_every=-1 \(must be an integer >= 0: epochs between probes"):
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["probe_every=-1"])
    assert resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["probe_test=train"]).probe.probe_test == "train"


def test_pretraining_tracks_its_encoder_from_its_first_step_to_its_last(demo_shards, tmp_path, capsys):
    """probe_every: kNN and the linear probe of the encoder on the probe set before the first step, every N epochs
    and after the last step, in the log, TensorBoard and the run's summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer import pretrain

    run_dir = tmp_path / "run"
    assert pretrain.main(pretrain.Pretraining, [
        "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "tiny_PT", "--data", demo_shards,
        "--output", str(run_dir), "--max-steps", "6", "probe_every=1", "checkpoint_every=0",
        "image_every=0"]) == 0
    out = capsys.readouterr().out
    log = (run_dir / "train.log").read_text()
    probed = [int(step) for step in re.findall(r"step (\d+): the encoder's probes \(train -> val, 12 videos\)", log)]
    assert probed[0] == 0 and probed[-1] == 6, probed
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    for name in ("probe/knn_top1", "probe/linear_top1"):
        steps = [e.step for e in events.Scalars(name)]
        assert steps == probed and all(0 <= e.value <= 100 for e in events.Scalars(name))
    # the run folder and its export give the same encoder (load_encoder tells a run's config.json from an export's)
    from_run, exported = load_encoder(str(run_dir)), from_pretrained(str(run_dir / "export" / "encoder"))
    assert all(torch.equal(a, b) for a, b in zip(from_run.state_dict().values(), exported.state_dict().values()))
    assert re.search(r"the encoder's probes \(train -> val, 12 videos; \d+ s of probing\):\n +step 0: kNN top1 "
                     r"[\d.]+ \(95%: [\d.]+-[\d.]+\), linear [\d.]+\n +step 6: kNN", out), out


def test_the_probe_options_are_checked_before_the_run_starts(demo_shards, tmp_path, capsys):
    from trainer import pretrain

    def refusal(*overrides):
        assert pretrain.main(pretrain.Pretraining, [
            "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "tiny_PT", "--data",
            demo_shards, "--output", str(tmp_path / "run"), *overrides]) == 2
        return capsys.readouterr().err

    assert "invalid probing: probe_every=-1 (must be an integer >= 0" in refusal("probe_every=-1")
    assert "probe_train='' (must be a split name" in refusal("probe_every=1", "probe_train=")
    assert re.search(r"probe_every=2: the probe set \(the first set of --data\) has no \['labelled'\] split \(it has "
                     r"\['pretrain', 'train', 'val'\]\)", refusal("probe_every=2", "probe_train=labelled"))
    assert "has no ['val']" in refusal("probe_every=1", f"probe_data={make_shards(tmp_path / 'other', n=2)}")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing started
