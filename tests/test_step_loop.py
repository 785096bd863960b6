"""The trainer's step loop and start: no host synchronisation per micro-step, every *_every option off at 0, bad
options refused before anything starts, and no start that hangs on a dead builder's lock."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_shards, once_per_run, process_env
from trainer import host_readback, pretrain
from trainer.cli import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "num_threads=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(once_per_run(tmp_path_factory, "loop", lambda folder: make_shards(folder, n=8, frames=40)) / "shards")


def ds_config(folder, micro=2, accumulation=1):
    path = os.path.join(folder, f"accum{accumulation}.json")
    with open(path, "w") as f:
        f.write(f'{{"train_micro_batch_size_per_gpu": {micro}, "gradient_accumulation_steps": {accumulation}, '
                '"bf16": {"enabled": false}, "zero_optimization": {"stage": 2}}')
    return path


OURS = ("trainer", "models", "dali_pipes")


def test_the_step_loop_reads_no_device_value_per_micro_step(shards, tmp_path, monkeypatch):
    """Reading a loss on the host (.item(), float()) waits for the GPU's queue; the loop reads each optimizer step's
    numbers one step later through a HostReadback instead, and nothing at all per micro-step."""
    reads, readbacks = [], []
    for name in ("item", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, _original=original, _name=name):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(OURS):
                reads.append(f"{caller}: {_name}")
            return _original(self)

        monkeypatch.setattr(torch.Tensor, name, counting)
    original_init = host_readback.HostReadback.__init__

    def counted_init(self, values):
        readbacks.append(values.shape)
        original_init(self, values)

    monkeypatch.setattr(host_readback.HostReadback, "__init__", counted_init)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--ds_config", ds_config(tmp_path, accumulation=2), "--recipe", "tiny_PT", "--data", shards, "--output",
            str(tmp_path / "run"), *TINY, "--max-steps", "4", "log_every=0", "image_every=0", "checkpoint_every=0"]
    assert pretrain.main(pretrain.Pretraining, args) == 0
    assert reads == [], reads  # today's loop read the loss twice per micro-step
    assert len(readbacks) == 4  # one per optimizer step, not per micro-step (8)


def test_every_every_option_is_off_at_zero(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["--ds_config", ds_config(tmp_path), "--recipe", "tiny_PT", "--data", shards, "--output", str(out), *TINY,
            "--max-steps", "5", "log_every=0", "image_every=0", "checkpoint_every=0"]
    assert pretrain.main(pretrain.Pretraining, args) == 0
    assert [n for n in os.listdir(out / "checkpoints") if n.startswith("step")] == ["step00000005"]  # the end only
    assert not os.path.exists(out / "pictures")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"] == []
    from trainer import finetune

    ft = tmp_path / "ft"
    args = ["--ds_config", ds_config(tmp_path), "--recipe", "demo_FT", "--data", shards, "--output", str(ft),
            "crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.depth=2",
            "model.embed_dim=64", "num_threads=1", "eval_split=train", "eval_clips=1", "eval_crops=1",
            "--max-steps", "4", "eval_every=0", "log_every=0", "checkpoint_every=0"]
    assert finetune.main(finetune.Finetuning, args) == 0
    assert os.path.exists(ft / "eval.json")  # the final test still runs


@pytest.mark.parametrize("override,named", [
    ("model.depth=-1", "depth"), ("repeats=0", "repeats"), ("crop_size=0", "crop_size"), ("stride=-4", "stride"),
    ("num_threads=0", "num_threads"), ("batch_size=0", "batch_size"), ("image_every=-1", "image_every"),
    ("checkpoint_every=2.5", "checkpoint_every"), ("mask_ratio=1.0", "mask_ratio"), ("decoder=nvdec", "decoder"),
    ("num_frames=0", "num_frames"), ("scale=(0.9, 0.5)", "scale"), ("model.decoder_keep=0", "decoder_keep"),
    ("model.decoder_subset=tube", "decoder_subset"),
])
def test_bad_options_are_refused_before_anything_starts(shards, tmp_path, override, named):
    """prepare() is everything the trainer does before starting a process group, DeepSpeed or DALI."""
    args = ["--ds_config", ds_config(tmp_path), "--recipe", "tiny_PT", "--data", shards, "--output",
            str(tmp_path / "run"), override]
    with pytest.raises((ValueError, TypeError), match=named):
        prepare(pretrain.Pretraining, args)
    assert not os.path.exists(tmp_path / "run")


def test_every_bad_option_is_named_in_one_message(shards, tmp_path):
    """model.depth=-1 repeats=0 decoder=nvdec named repeats and decoder; depth came on the next try."""
    args = ["--ds_config", ds_config(tmp_path), "--recipe", "tiny_PT", "--data", shards, "--output",
            str(tmp_path / "run"), "model.depth=-1", "repeats=0", "decoder=nvdec"]
    with pytest.raises(ValueError) as err:
        prepare(pretrain.Pretraining, args)
    for named in ("depth=-1", "repeats=0", "decoder='nvdec'"):
        assert named in str(err.value), named






def test_the_shipped_zero2_config_reads_the_host_once_per_step_not_three_times(monkeypatch):
    """In DeepSpeed 0.19.8 bf16's check_grad_overflow defaults to true: ZeRO-2 then tests every gradient for inf/NaN,
    all-reduces the verdict and reads it (`.item()`) each step, besides its test of the norm while clipping. The
    shipped configs turn it off (the loss guard stops on a non-finite loss or gradient norm instead)."""
    import json

    import deepspeed

    from trainer.engine import init_distributed

    init_distributed()
    shipped = json.load(open(os.path.join(ROOT, "ds_configs", "zero2_bf16.json")))
    assert shipped["bf16"]["check_grad_overflow"] is False
    counted = {"reads": 0}
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("deepspeed"):
                counted["reads"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_per_step(check: bool) -> int:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
        config = {**shipped, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.02,
                  "zero_allow_untested_optimizer": True, "bf16": {"enabled": True, "check_grad_overflow": check}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
        x = torch.randn(2, 8, dtype=torch.bfloat16)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        counted["reads"] = 0
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        return counted["reads"]

    assert reads_per_step(check=False) == 1  # the norm's test while clipping (stage_1_and_2.py)
    assert reads_per_step(check=True) == 3


def test_a_start_after_one_killed_while_building_neither_hangs_nor_builds(shards, tmp_path):
    """A Ctrl-C during DeepSpeed's first build left its lock behind, and every later start waited on it, silently.
    Now the lock is removed with a warning, and the CPU shared-memory op, which training never uses, is not built."""
    extensions = tmp_path / "extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").write_text("")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "trainer", "pretrain.py"), "--ds_config", ds_config(tmp_path), "--recipe",
         "tiny_PT", "--data", shards, "--output", str(tmp_path / "run"), *TINY, "--max-steps", "2"],
        capture_output=True, text=True, timeout=240,
        env=process_env(TORCH_EXTENSIONS_DIR=extensions))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "removed a stale build lock" in result.stdout + result.stderr
    assert os.listdir(extensions / "deepspeed_shm_comm") == []  # nothing was built


def test_a_set_up_that_fails_gives_the_process_its_signal_handlers_back(shards, tmp_path):
    """A tool or a test goes on in the process after a refused set-up: the trainer's stop-signal handlers (installed
    first thing) must not stay behind (a later SIGTERM logged "checkpointing at the next optimizer step")."""
    import signal

    from trainer.ds_config import ConfigConflict
    from trainer.setup import RunArgs, set_up

    task, args, model_cfg = prepare(pretrain.Pretraining, ["--ds_config", ds_config(tmp_path), "--recipe", "tiny_PT",
                                                           "--data", shards, "--output", str(tmp_path / "run"), *TINY])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigConflict):
        set_up(task, dataclasses.replace(RunArgs.from_command_line(args), ds_config=str(broken)), model_cfg)
    assert {s: signal.getsignal(s) for s in before} == before
