"""Weighted mixtures of shard sets (dali_pipes/mixture.py): the --data spec, the schedule's proportions, the real
loader's shares, determinism and exact resume, a pretraining run killed and resumed on a mixture, and fine-tuning's
refusal."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_shards, process_env
from dali_pipes import build_pretrain_loader
from dali_pipes.cursor import Cursor
from dali_pipes.mixture import Schedule, ShardSource, parse_data
from trainer import finetune, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "num_threads=1", "image_every=0",
        "log_every=0", "shuffle_buffer=8"]
WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three tiny sets of 6, 5 and 4 clips (labels 0..n-1 within each)."""
    root = tmp_path_factory.mktemp("mixture")
    return [make_shards(root / name, n=n, frames=24) for name, n in (("a", 6), ("b", 5), ("c", 4))]


def spec(sets) -> str:
    a, b, c = sets
    return f"a={a}:0.5,b={b}:0.3:sampling=segments,c={c}:0.2:flip=False:stride=2"


def loader(data, **options):
    return build_pretrain_loader(data, **{"batch_size": 2, "repeats": 1, "num_frames": 2, "crop_size": 16,
                                          "seed": 1, "num_threads": 1, "shuffle_buffer": 8, **options})


def drawn(stream, count: int) -> list:
    """(set index, labels) of the next `count` batches of a loader, across epochs; the set is the one whose reader
    moved (read off the loader's StreamCursor)."""
    found = []
    while len(found) < count:
        before = stream.cursor.sets
        for batch in stream:
            moved = [i for i, (x, y) in enumerate(zip(before, stream.cursor.sets)) if x != y]
            assert len(moved) == 1
            found.append((moved[0], batch["label"].tolist()))
            before = stream.cursor.sets
            if len(found) == count:
                break
    return found


def test_the_spec_parses_names_locations_weights_and_plan_options():
    assert parse_data("demo_data/shards") == (ShardSource("data", "demo_data/shards", 1.0),)
    assert parse_data("s3://bucket/k400") == (ShardSource("data", "s3://bucket/k400", 1.0),)
    got = parse_data("k400=s3://bucket/k400:3,ssv2=ssv2/shards:1:sampling=segments:flip=False:target_fps=None")
    assert got == (ShardSource("k400", "s3://bucket/k400", 0.75),
                   ShardSource("ssv2", "ssv2/shards", 0.25, {"sampling": "segments", "flip": False,
                                                             "target_fps": None}))
    # weights from the recipe (loading.mixture) where the spec gives none; the spec's own win
    got = parse_data("a=https://host/a,b=/x/b:0.5", {"a": 1.5, "b": 9})
    assert [(s.name, s.location, s.weight) for s in got] == [("a", "https://host/a", 0.75), ("b", "/x/b", 0.25)]


def test_every_problem_of_a_spec_is_named_in_one_message():
    with pytest.raises(ValueError) as caught:
        parse_data("a=/x:0.5:repeats=2,b=/y:zero,c=/z:1:2,/w:1,a=/v:1,d=:1,e=/u:1:sampling=random:stride=0,f=/t",
                   {"g": 1.0})
    message = str(caught.value)
    assert message.count("invalid --data") == 1
    for part in ("option 'repeats' cannot differ per set", "set 'b': weight 'zero'", "set 'c': a second weight '2'",
                 "'/w:1' is not NAME=LOCATION", "set 'a' is named 2 times", "set 'd' has no location",
                 "sampling='random'", "stride=0", "set 'f' has no weight", "loading.mixture names 'g'"):
        assert part in message, part
    with pytest.raises(ValueError, match="one unnamed location"):
        parse_data("demo_data/shards", {"k400": 1.0})
    with pytest.raises(ValueError, match=r"a weight belongs to a named set of a mixture, NAME=LOCATION:WEIGHT .* one "
                                         r"set takes no weight: --data demo_data/shards$"):
        parse_data("demo_data/shards:0.5")  # (it said "no shards folder demo_data/shards:0.5")


@pytest.mark.parametrize("world_size", [1, 8, 64])
def test_the_schedule_holds_the_weights_over_every_window_of_10000_samples(world_size):
    batch, weights = 8, (0.55, 0.335, 0.1, 0.015)
    steps = 100_000 // (batch * world_size)
    schedule = Schedule(weights, seed=3, world_size=world_size)
    sets = schedule.set_of(np.arange(world_size)[None, :], np.arange(steps)[:, None])  # [steps, ranks]
    samples = np.repeat(sets.reshape(-1), batch)  # the global stream: step by step, rank by rank
    counts = np.concatenate([np.zeros((1, len(weights))), np.cumsum(np.eye(len(weights))[samples], axis=0)])
    windows = (counts[10_000:] - counts[:-10_000]) / 10_000  # every window of 10,000 consecutive samples
    assert np.abs(windows - weights).max() < 0.01
    if world_size > 1:  # the ranks of one step draw different sets
        assert all(len(set(step)) > 1 for step in sets)
    assert np.array_equal(sets, Schedule(weights, 3, world_size).set_of(np.arange(world_size)[None, :],
                                                                         np.arange(steps)[:, None]))
    assert not np.array_equal(sets, Schedule(weights, 4, world_size).set_of(np.arange(world_size)[None, :],
                                                                             np.arange(steps)[:, None]))


def test_the_real_loader_draws_the_weighted_shares_deterministically(sets):
    mixed = loader(spec(sets))
    assert len(mixed) == 3 + 3 + 2  # an epoch: as many batches as all the sets' clips make
    assert [m.config.views.spec.sampling for m in mixed.members] == ["stride", "segments", "stride"]
    assert [m.config.views.spec.flip for m in mixed.members] == [True, True, False]
    got = drawn(mixed, 200)
    shares = np.bincount([s for s, _ in got], minlength=3) / len(got)
    assert np.abs(shares - WEIGHTS).max() < 0.01, shares
    assert all(set(labels) <= set(range((6, 5, 4)[s])) for s, labels in got)  # each batch whole from its set
    assert mixed.epoch == 25  # 200 batches of 8 per epoch
    assert drawn(loader(spec(sets)), 40) == got[:40]  # the same seed, the same batches
    assert drawn(loader(spec(sets), seed=2), 40) != got[:40]


def test_the_loader_state_resumes_a_mixture_exactly_mid_epoch(sets):
    whole = drawn(loader(spec(sets)), 30)
    first = loader(spec(sets))
    taken = drawn(first, 13)  # epoch 1, batch 5
    state = json.loads(json.dumps(first.state_dict()))  # through a file
    assert (state["cursor"]["epoch"], state["cursor"]["position"], len(state["cursor"]["sets"])) == (1, 5, 3)
    first.close()
    resumed = loader(spec(sets))
    resumed.load_state_dict(state)
    assert taken + drawn(resumed, 17) == whole
    with pytest.raises(ValueError, match="holds 3 set"):
        loader(sets[0]).load_state_dict(state)


def test_a_state_saved_before_mixtures_loads_as_the_one_sets(sets):
    reference = loader(sets[0])
    whole = drawn(reference, 6)
    first = loader(sets[0])
    drawn(first, 4)
    state = first.state_dict()
    plain = {**state, "cursor": first.cursor.sets[0].as_dict()}  # what a checkpoint held before mixtures
    assert Cursor.from_dict(plain["cursor"]).position == 1
    resumed = loader(sets[0])
    resumed.load_state_dict(plain)
    assert drawn(resumed, 2) == whole[4:]


def _losses(output) -> dict:
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_pretraining_on_a_mixture_killed_after_a_checkpoint_resumes_with_the_same_losses(sets, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def args(out, steps):
        return ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "tiny_PT", "--data",
                spec(sets), "--output", str(tmp_path / out), *TINY, "checkpoint_every=2", "--max-steps", str(steps)]

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "trainer", "pretrain.py"), *args("killed", 12)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=process_env())
    latest, deadline = os.path.join(killed, "checkpoints", "latest"), time.time() + 120
    while time.time() < deadline and not os.path.exists(latest):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "export")), "the kill should land before the end"
    assert pretrain.main(pretrain.Pretraining, args("whole", 12)) == 0
    assert pretrain.main(pretrain.Pretraining, args("killed", 12)) == 0
    whole, resumed = _losses(tmp_path / "whole"), _losses(killed)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step
    log = open(os.path.join(killed, "train.log")).read()
    assert "resumed from step" in log and "mixture of 3 sets" in log and "a (" in log


def test_fine_tuning_refuses_a_mixture(sets, tmp_path, capsys):
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "demo_FT", "--data",
            spec(sets), "--output", str(tmp_path / "ft")]
    assert finetune.main(finetune.Finetuning, args) == 2
    assert "Finetuning needs one label space, and a mixture's labels are per set" in capsys.readouterr().err


def test_the_benchmark_reads_a_mixture_in_its_loader_mode_only(sets, capsys):
    from tools import benchmark
    from tools.bench.loaders import available_decoders

    assert available_decoders({"shards": spec(sets), "split": "train"}) == ["dali-cpu", "pyav"]
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["stages", "--shards", spec(sets)])
    assert stopped.value.code == 2 and "only the loader mode reads one" in capsys.readouterr().err
