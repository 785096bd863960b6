"""trainer/pretrain.py on the CPU: 1 and 2 processes, ZeRO-2 and ZeRO-3, kill -9 and resume, a different number of
processes, TensorBoard, the loss guard and the config checks."""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import free_port, make_shards, once_per_run, process_env
from models import build_classifier, load_pretrained
from trainer import pretrain
from trainer.ds_config import ConfigConflict, plan_batch, read_ds_config
from trainer.engine import warmup_cosine
from trainer.monitor import LossGuard
from trainer.recipes import PRETRAIN_RECIPES, resolve_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "trainer", "pretrain.py")
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "num_threads=1", "image_every=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(once_per_run(tmp_path_factory, "pt", lambda folder: make_shards(folder, n=8, frames=40)) / "shards")


def ds_config(folder, stage, micro=2):
    path = os.path.join(folder, f"zero{stage}.json")
    with open(path, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                   "bf16": {"enabled": False}, "zero_optimization": {"stage": stage}}, f)
    return path


def command(processes, config, data, output, *extra, port=None):
    """The trainer on one process, or on several started by DeepSpeed's launcher (the README's)."""
    trainer = [SCRIPT, "--ds_config", config, "--recipe", "tiny_PT", "--data", data, "--output", output, *TINY, *extra]
    if processes == 1:
        return [sys.executable, *trainer]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(processes),
            "--master_port", str(port or free_port()), *trainer]


class Ranks:
    """2 trainer processes started as torchrun starts them, with no launcher in between (4 s sooner than DeepSpeed's
    on 2 cores), each in a session of its own that a kill ends with whatever it started."""

    def __init__(self, config, data, output, *extra):
        self.logs, self.procs = [], []
        port = free_port()
        for rank in range(2):
            self.logs.append(tempfile.TemporaryFile("w+"))
            self.procs.append(subprocess.Popen(
                command(1, config, data, output, *extra), stdout=self.logs[-1], stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
                env=process_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))

    def kill(self):
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGKILL)
        for proc, log in zip(self.procs, self.logs):
            proc.wait()
            log.close()

    def finish(self, timeout=300) -> str:
        """Both ranks' output, once both exited 0."""
        codes = [proc.wait(timeout=timeout) for proc in self.procs]
        text = ""
        for log in self.logs:
            log.seek(0)
            text += log.read()
            log.close()
        assert codes == [0, 0], text[-6000:]
        return text


def losses(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def in_process(config, data, output, *extra) -> None:
    """The trainer of `command(1, ...)`, run in this process (a process start costs about 5 s here); it prints to the
    test's captured stdout."""
    assert pretrain.main(pretrain.Pretraining, ["--ds_config", config, "--recipe", "tiny_PT", "--data", data,
                                                "--output", output, *TINY, *extra]) == 0


def test_one_process_learns_and_writes_everything(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    in_process(ds_config(tmp_path, 2, micro=4), shards, out, "--max-steps", "60", "blr=0.05", "warmup_epochs=1",
               "epochs=40", "checkpoint_every=30")
    text = capsys.readouterr().out
    assert "done: 60 steps" in text and "video decoder: dali-cpu" in text and "encoder flash" in text
    seen = losses(out)
    first, last = sum(seen[s] for s in range(1, 6)) / 5, sum(seen[s] for s in range(56, 61)) / 5
    assert last < 0.75 * first, (first, last)  # overfitting a handful of clips
    # TensorBoard holds the scalars and the reconstruction picture
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"images": 0}).Reload()
    for tag in ("loss", "lr", "grad_norm", "clips_per_s", "data_wait_share", "mfu", "memory_gb", "skipped_videos"):
        assert f"train/{tag}" in events.Tags()["scalars"], tag
    assert events.Tags()["images"] == ["reconstruction"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 61, 5))  # tiny_PT: log_every 5
    assert os.path.exists(os.path.join(out, "pictures", "reconstruction_step00000060.png"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["clips_per_step"] == 4 and config["lr"] == pytest.approx(0.05 * 4 / 256)
    # the fp32 export is mae_st's format, and fine-tuning takes its encoder
    classifier = build_classifier("vit_tiny", num_classes=3, img_size=32, num_frames=4, embed_dim=64)
    export = torch.load(os.path.join(out, "export", "mae_st_pretrain.pth"), weights_only=True)["model"]
    report = load_pretrained(classifier, os.path.join(out, "export", "mae_st_pretrain.pth"))
    assert report.source_format == "mae_st" and report.fresh == ["head.weight", "head.bias"]
    assert torch.equal(classifier.patch_embed.proj.weight, export["patch_embed.proj.weight"])  # the weights arrived
    assert torch.equal(classifier.blocks[1].attn.qkv.weight, torch.cat([export[f"blocks.1.attn.{x}.weight"]
                                                                        for x in "qkv"]))


@pytest.fixture(scope="module")
def reference_losses(shards, tmp_path_factory):
    """The per-step losses of an uninterrupted 2-process ZeRO-2 run of 10 steps. ZeRO-3 gives the same losses to
    rel 2e-7 in fp32 (measured: the same sums of the same 2 gradients), so the ZeRO-3 kill and the ZeRO-2 preemption
    are each held to this one run, within the tests' rel 1e-6."""
    def build(folder):
        Ranks(ds_config(folder, 2), shards, str(folder / "run"), "--max-steps", "10", "checkpoint_every=0").finish()

    return losses(str(once_per_run(tmp_path_factory, "reference", build) / "run"))


@pytest.mark.long
def test_kill_and_resume_continues_with_the_same_losses(shards, tmp_path, reference_losses, capsys):
    """SIGKILL under ZeRO-3 (sharded parameters: the hardest state to restore). ZeRO-2's exact resume is the
    preemption test's; every shipped ds_config's save -> resume -> export, test_every_shipped_ds_config_...'s."""
    stage = 3
    config = ds_config(tmp_path, stage)
    killed = str(tmp_path / "killed")
    args = (config, shards, killed, "--max-steps", "10", "checkpoint_every=2")
    ranks = Ranks(*args)
    latest = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(latest) and open(latest).read() >= "step00000004"):
        time.sleep(0.02)
    ranks.kill()
    assert not os.path.exists(os.path.join(killed, "export")), "the kill should land before the end"
    resumed_from = open(latest).read()
    text = Ranks(*args).finish()
    assert f"resumed from {resumed_from}" in text
    expected, got = reference_losses, losses(killed)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    # and on one process: through DeepSpeed's universal checkpoint, the global batch kept
    in_process(config, shards, killed, "--max-steps", "12")
    text = capsys.readouterr().out
    assert "universal" in text and "done: 12 steps" in text
    assert "resuming a run of 2 process(es) x 2 clips x 1 accumulation on 1 x 2 x 2: the same 4 clips per " \
           "optimizer step" in text
    assert "loader state saved by 2 rank(s) x 2 clips per batch, now 1 x 2: epoch 5 goes on at batch 0 of 4" in text
    config_json = json.load(open(os.path.join(killed, "config.json")))
    assert config_json["clips_per_step"] == 4 and config_json["total_steps"] == json.load(open(os.path.join(
        killed, "checkpoints", "step00000012", "meta.json")))["total_steps"]


def test_a_universal_resume_puts_every_optimizer_state_where_fused_adamw_steps():
    """DeepSpeed's universal loader writes state['step'] as the file had it (a CPU tensor, or a number), where torch's
    own loader moves a fused AdamW's step to the parameter's device as float32: on a GPU the first step after such a
    resume would meet a CPU step. Checked on the placement logic (a 'meta' parameter stands for the GPU) and on a
    real fused AdamW."""
    from types import SimpleNamespace

    from trainer.checkpointing import place_optimizer_state

    param = torch.zeros(3, device="meta")
    state = {"step": torch.tensor(7), "exp_avg": torch.zeros(3, dtype=torch.float64), "exp_avg_sq": torch.zeros(3)}
    place_optimizer_state(SimpleNamespace(param_groups=[{"params": [param], "fused": True}], state={param: state}))
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in state.values()), state
    plain = {"step": 7}
    place_optimizer_state(SimpleNamespace(param_groups=[{"params": [param], "fused": False}], state={param: plain}))
    assert plain["step"].device.type == "cpu" and plain["step"].dtype == torch.float32  # (torch's own policy)
    weight = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([weight], fused=True)
    weight.grad = torch.ones(3)
    adam.step()
    adam.state[weight]["step"] = 7  # as a universal checkpoint may leave it
    place_optimizer_state(adam)
    adam.step()
    assert adam.state[weight]["step"].item() == 8


SUPERVISE = os.path.join(ROOT, "trainer", "supervise.py")


@pytest.mark.long
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_job_signalled_under_its_launcher_checkpoints_exits_75_and_resumes_with_the_same_losses(
        launcher, shards, tmp_path, reference_losses):
    """What scancel, a time limit or Ctrl-C does: SIGTERM to every process of the job. Without trainer/supervise.py
    the deepspeed launcher died at once (exit 143) and killed the trainers within 2 s (their second signal ended
    them); torchrun checkpointed but exited 1. Under it: one checkpoint on the step all ranks agree on,
    preempted.json, the job's exit code 75, and a requeued job that goes on with the losses of a run never
    stopped."""
    out, port = str(tmp_path / "preempted"), free_port()
    trainer = command(1, ds_config(tmp_path, 2), shards, out, "--max-steps", "10", "checkpoint_every=0")[1:]
    prefix = {"deepspeed": [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                            "--master_port", str(port)],
              "torchrun": [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
                           "--master-port", str(port)]}[launcher]
    proc = subprocess.Popen([sys.executable, SUPERVISE, *prefix, *trainer], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=process_env())
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the job's process group: supervisor, launcher, trainers
    text = proc.communicate(timeout=180)[0]
    marker = json.load(open(os.path.join(out, "preempted.json")))
    stopped = marker["step"]
    assert proc.returncode == 75, text[-3000:]
    assert 3 < stopped < 10 and marker["checkpoint"] == f"step{stopped:08d}", text[-3000:]
    assert text.count(f"stopped by SIGTERM at step {stopped}") == 1  # (the launcher's own SIGTERM changed nothing)
    assert open(os.path.join(out, "checkpoints", "latest")).read() == marker["checkpoint"]
    # the requeued job (its ranks started directly: the launcher's part is proven above)
    text = Ranks(ds_config(tmp_path, 2), shards, out, "--max-steps", "10", "checkpoint_every=0").finish()
    assert f"resumed from {marker['checkpoint']}" in text and not os.path.exists(os.path.join(out, "preempted.json"))
    expected, got = reference_losses, losses(out)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


STORE_FAILS_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
from dali_pipes import loader
from dali_pipes.shard_store import StoreUnavailable
from trainer import pretrain

original, served = loader.VideoLoader.__iter__, [0]

def iterate(self):  # rank 1's store stops answering after 3 batches (the reader's retries spent)
    for batch in original(self):
        served[0] += 1
        if os.environ["RANK"] == "1" and served[0] > 3:
            raise StoreUnavailable("s3://bucket/set stopped answering: batch 3 of epoch 0 failed 6 times over 31 s")
        yield batch

loader.VideoLoader.__iter__ = iterate
sys.exit(pretrain.main(pretrain.Pretraining, sys.argv[1:]))
"""


def test_a_store_failing_on_one_rank_ends_every_rank_with_exit_code_4(shards, tmp_path):
    """The rank whose store stopped answering used to exit 4 while the others waited in the step's collectives until
    their timeout (then died on it): the job's code was not 4. It now steps on a placeholder batch until every rank
    has read the failure with a step's numbers; all exit 4, nothing checkpointed after the failure."""
    out = str(tmp_path / "run")
    args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT", "--data", shards, "--output", out, *TINY,
            "checkpoint_every=2", "--max-steps", "10"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", STORE_FAILS_ON_RANK_1.format(root=ROOT), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=process_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [4, 4], outputs[0][-3000:] + outputs[1][-3000:]
    assert "stopped answering: batch 3 of epoch 0" in outputs[1]
    assert "the shard store stopped answering on 1 rank(s) of 2" in outputs[0]
    latest = open(os.path.join(out, "checkpoints", "latest")).read()
    assert latest == "step00000002" and f"the last good checkpoint is {out}/checkpoints/{latest}" in outputs[0]
    assert [name for name in os.listdir(os.path.join(out, "checkpoints")) if name.startswith("step")] == [latest]


def _nan_at_step_3(self, engine, batch):
    loss, outputs = original_loss(self, engine, batch)
    if engine.global_steps == 2:
        loss = loss * float("nan")
    return loss, outputs


original_loss = pretrain.Pretraining.loss


def test_guard_stops_on_a_nan_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pretrain.Pretraining, "loss", _nan_at_step_3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT", "--data", shards, "--output", out, *TINY,
            "checkpoint_every=1", "--max-steps", "6"]
    assert pretrain.main(pretrain.Pretraining, args) == 3
    assert "stopping at step 3: the loss is nan" in caplog.text
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step00000002"
    assert not os.path.exists(os.path.join(out, "checkpoints", "step00000003"))


def test_loss_guard_rules():
    guard = LossGuard()
    assert all(guard.check(v) is None for v in (1.0, 0.9, 0.8, 0.8, 0.7, 1.5))  # 1.5 < 2 x 0.84
    assert "jumped to 3.0000" in guard.check(3.0)
    assert "inf" in guard.check(float("inf"))
    assert "gradient norm is nan" in guard.check(1.0, grad_norm=float("nan"))
    fresh = LossGuard()  # blind for its first 5 steps before: blr=1e4 went 1.48 -> 1.3e12 at step 2, unchecked
    assert fresh.check(1.48) is None and "jumped to 1300000000000.0000" in fresh.check(1.3e12)
    resumed = LossGuard()
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert "jumped" in resumed.check(10.0)


def _jump_at_step_4(self, engine, batch):
    loss, outputs = original_loss(self, engine, batch)
    return (loss * 1e6 if engine.global_steps == 3 else loss), outputs


def test_a_resumed_run_is_guarded_from_its_first_step(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT", "--data", shards, "--output", out, *TINY,
            "checkpoint_every=1", "explosion_factor=2.0", "blr=1e-4"]
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "3"]) == 0
    saved = torch.load(os.path.join(out, "checkpoints", "step00000003", "rank00000.pt"), weights_only=False)
    assert len(saved["guard"]["history"]) == 3
    monkeypatch.setattr(pretrain.Pretraining, "loss", _jump_at_step_4)
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "8"]) == 3
    assert "stopping at step 4: the loss jumped" in caplog.text
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step00000003"


def test_a_restart_with_other_overrides_says_what_changed_and_refuses_what_breaks_continuation(shards, tmp_path,
                                                                                              monkeypatch, caplog):
    """Resuming with blr=0.5 repeats=1 used to continue silently and overwrite config.json."""
    from trainer.cli import prepare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT", "--data", shards, "--output", out, *TINY,
            "image_every=0"]
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "2"]) == 0
    with pytest.raises(ValueError) as err:
        prepare(pretrain.Pretraining, [*args, "--max-steps", "3", "blr=0.5", "repeats=1", "log_every=1"])
    assert "checkpointed at step 2 with another recipe (optim.blr 0.015 -> 0.5, views.repeats 2 -> 1)" in str(err.value)
    assert "--allow-changes" in str(err.value)  # (log_every changes no result: not listed)
    prepare(pretrain.Pretraining, [*args, "--max-steps", "3", "log_every=1"])  # bookkeeping may change
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "3", "blr=0.5", "--allow-changes"]) == 0
    assert "resuming with recipe changes (logged in RUN_DIR/configs/): optim.blr 0.015 -> 0.5" in caplog.text
    starts = sorted(os.listdir(os.path.join(out, "configs")))
    assert starts == ["start001.json", "start002.json"]
    assert [json.load(open(os.path.join(out, "configs", name)))["recipe"]["optim"]["blr"] for name in starts] == [
        0.015, 0.5]
    with pytest.raises(ValueError) as err:  # a model option is named, not the two whole option dicts
        prepare(pretrain.Pretraining, [*args, "--max-steps", "4", "blr=0.5", "model.decoder_keep=0.5"])
    assert "(model.options.decoder_keep None -> 0.5)" in str(err.value)
    from trainer import finetune

    with pytest.raises(ValueError, match=r"holds a pretraining run \(checkpointed at step 3\), not a fine-tuning one: "
                                         r"fine-tune from it into a new --output with --pretrained"):
        prepare(finetune.Finetuning, ["--ds_config", ds_config(tmp_path, 2), "--recipe", "demo_FT", "--data", shards,
                                      "--output", out, "eval_split=train"])


def test_a_resume_on_other_data_is_refused_unless_allowed_and_then_reads_it_from_its_beginning(shards, tmp_path,
                                                                                             monkeypatch, caplog):
    """Resuming a run with another --data was accepted without a word: the cursor of one set went on over another.
    The same shards moved elsewhere are the same data; another set, or a mixture's other weights, are refused unless
    --allow-changes, and then the new data is read from its beginning."""
    import shutil

    from trainer.cli import prepare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    common = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT", "--output", out, *TINY, "image_every=0"]
    assert pretrain.main(pretrain.Pretraining, [*common, "--data", shards, "--max-steps", "2"]) == 0
    other = make_shards(tmp_path / "other", n=4, frames=20)
    moved = shutil.copytree(shards, tmp_path / "moved")
    prepare(pretrain.Pretraining, [*common, "--data", str(moved), "--max-steps", "3"])  # the same shards elsewhere
    for data, said in ((other, f"the data data={shards} -> data={other}"),
                       (f"a={shards}:0.5,b={other}:0.5", f"the data data={shards} -> a={shards}:0.5,b={other}:0.5")):
        with pytest.raises(ValueError) as err:
            prepare(pretrain.Pretraining, [*common, "--data", data, "--max-steps", "3"])
        assert f"checkpointed at step 2 with another data ({said})" in str(err.value), str(err.value)
        assert "--allow-changes" in str(err.value) and "the new data is read from its beginning" in str(err.value)
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert pretrain.main(pretrain.Pretraining, [*common, "--data", other, "--max-steps", "3",
                                                    "--allow-changes"]) == 0
    assert f"resuming on other data (--allow-changes): data={shards} -> data={other}" in caplog.text
    assert "resumed from step00000002 at step 2 (epoch 0, batch 0)" in caplog.text
    assert json.load(open(os.path.join(out, "config.json")))["data"] == other and sorted(losses(out)) == [1, 2, 3]


def test_overrides_take_the_fields_declared_types():
    """epochs=2.5 and warmup_epochs=0.01 were refused as "expected a int": typed by the default's literal."""
    recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_B_16x4_MAE_PT", [
        "epochs=2.5", "warmup_epochs=0.01", "target_fps=None", "batch_size=None", "betas=[0.9, 0.99]", "seed=3"])
    assert (recipe.optim.epochs, recipe.optim.warmup_epochs, recipe.views.target_fps, recipe.optim.batch_size) == (
        2.5, 0.01, None, None)
    assert recipe.optim.betas == (0.9, 0.99) and recipe.run.seed == 3
    with pytest.raises(ValueError) as err:
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["repeats=2.5", "epochs=many", "nope=1"])
    message = str(err.value)  # every bad override at once
    assert "repeats='2.5' (must be int)" in message and "epochs='many' (must be float)" in message
    assert "unknown recipe field 'nope'" in message


def test_config_conflicts_are_explained_in_one_message(tmp_path):
    recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_L_16x4_MAE_PT", [])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                                "optimizer": {"type": "Adam"}, "fp16": {"enabled": True}, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigConflict) as err:
        read_ds_config(str(path), recipe)
    message = str(err.value)
    for phrase in ("not train_batch_size", "remove the 'optimizer' section", "fp16 is not supported",
                   "gradient_clipping is 1.0 here but clip_grad is 0.02"):
        assert phrase in message, phrase
    good = read_ds_config(os.path.join(ROOT, "ds_configs", "zero2_bf16.json"), recipe)
    assert good.for_deepspeed(recipe, plan_batch(512, good.micro_batch, 64))["gradient_clipping"] == 0.02


def test_the_recipes_global_batch_fits_any_number_of_processes_by_accumulation():
    """The paper's 512 clips per step from 8 clips per GPU: 64 accumulation steps on one GPU, 8 on one node, 1 on 64
    GPUs; refused only where the numbers cannot divide, with the choices that would."""
    for world, accumulation in ((1, 64), (8, 8), (16, 4), (64, 1)):
        plan = plan_batch(512, 8, world)
        assert (plan.accumulation, plan.clips_per_step) == (accumulation, 512), world
    assert plan_batch(None, 4, 2, accumulation=3).clips_per_step == 24  # no recipe batch: the ds_config's
    with pytest.raises(ConfigConflict) as err:
        plan_batch(512, 8, 128)  # 16 nodes: half a micro-step each
    message = str(err.value)
    assert "512 / (8 x 128) = 0.5 micro-steps" in message
    assert "train_micro_batch_size_per_gpu 4 (accumulation 1)" in message and "64 processes (accumulation 1)" in message
    assert "batch_size=1024" in message
    with pytest.raises(ConfigConflict, match=r"4 processes \(accumulation 3\); 6 processes"):
        plan_batch(96, 8, 5)  # 96 clips over 5 processes


def test_shipped_ds_configs_fit_the_recipes_on_any_world_they_divide():
    for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16", "cpu"):
        recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_H_16x4_MAE_PT" if name != "cpu" else "tiny_PT", [])
        config = read_ds_config(os.path.join(ROOT, "ds_configs", f"{name}.json"), recipe)
        for world in (1, 8, 16, 64):  # one GPU, one node, two nodes (the README's launchers), the paper's 64
            plan = plan_batch(recipe.optim.batch_size, config.micro_batch, world, config.accumulation)
            settings = config.for_deepspeed(recipe, plan)
            # what DeepSpeed checks at start (runtime/config.py _batch_assertion), and the recipe's global batch
            micro, accumulation = settings["train_micro_batch_size_per_gpu"], settings["gradient_accumulation_steps"]
            assert micro == config.micro_batch and accumulation >= 1, (name, world)
            expected = recipe.optim.batch_size or config.micro_batch * (config.accumulation or 1) * world
            assert micro * accumulation * world == expected, (name, world, micro, accumulation)


def test_recipe_overrides_and_schedule():
    recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_B_16x4_MAE_PT",
                            ["blr=1e-3", "epochs=10", "decoder=pyav", "model.drop_path_rate=0.1", "betas=(0.9, 0.99)"])
    assert (recipe.optim.blr, recipe.optim.epochs, recipe.loading.decoder, recipe.optim.betas) == (1e-3, 10.0, "pyav",
                                                                                                  (0.9, 0.99))
    assert recipe.model.options == {"norm_pix_loss": True, "drop_path_rate": 0.1}
    with pytest.raises(ValueError, match="unknown recipe field 'lr_peak'"):
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["lr_peak=1"])
    with pytest.raises(ValueError, match="unknown recipe field 'bl'; did you mean blr\\?"):
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["bl=1e-3"])
    with pytest.raises(ValueError, match="lr = blr x clips per optimizer step / 256 .* set blr="):
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["lr=1e-3"])
    with pytest.raises(ValueError, match=r"repeats='two' \(must be int\)"):
        resolve_recipe(PRETRAIN_RECIPES, "tiny_PT", ["repeats=two"])
    assert [round(warmup_cosine(s, 10, 110, 0.0), 3) for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cpu", "zero1_bf16", "zero2_bf16", "zero3_bf16"])
def test_every_shipped_ds_config_trains_checkpoints_resumes_and_exports(shards, tmp_path, monkeypatch, name):
    """bf16 + ZeRO-1 + fp32 accumulation is DeepSpeed's BF16_Optimizer, whose checkpoints zero_to_fp32 refuses: the
    export at the end of a run, and fine-tuning from its folder, failed. Each config, in bf16 where it says so."""
    from trainer.checkpointing import fp32_weights, read_weights

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", f"{name}.json"), "--recipe", "tiny_PT", "--data", shards,
            "--output", str(out), *TINY, "image_every=0", "checkpoint_every=1", "log_every=0"]
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "1"]) == 0
    assert pretrain.main(pretrain.Pretraining, [*args, "--max-steps", "2"]) == 0  # resumed from step 1
    assert sorted(losses(out)) == [1, 2]
    export = out / "export" / "mae_st_pretrain.pth"
    classifier = build_classifier("vit_tiny", num_classes=3, img_size=32, num_frames=4, embed_dim=64)
    assert load_pretrained(classifier, str(export)).source_format == "mae_st"
    weights = read_weights(str(out))  # what fine-tuning from the run folder reads
    assert set(weights) == set(fp32_weights(str(out / "checkpoints"), "step00000002"))
    if name != "zero3_bf16":  # (ZeRO-3 keeps no whole module to compare with)
        module = torch.load(out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                            weights_only=False)["module"]
        for key, value in module.items():  # the training copy is the fp32 master weights rounded to its dtype
            assert torch.equal(weights[key].to(value.dtype), value), key


def test_decoder_masking_trains_and_resumes_with_the_same_losses(shards, tmp_path, monkeypatch, capsys):
    """The decoder's subsets are drawn from the run's one random stream, as the masks are: a run resumed at step 2
    goes on exactly as one that never stopped."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def train(out, steps):
        args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "tiny_PT_DM50", "--data", shards, "--output",
                str(tmp_path / out), *TINY, "image_every=0", "checkpoint_every=2", "log_every=0", "--max-steps", steps]
        assert pretrain.main(pretrain.Pretraining, args) == 0

    train("whole", "4")
    train("resumed", "2")
    train("resumed", "4")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4] and json.load(open(tmp_path / "whole" / "config.json"))["recipe"][
        "model"]["options"]["decoder_keep"] == 0.5
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step
    # scored afterwards over every masked token: the decoder at keep 1, the run's weights
    from tools import reconstruction_loss

    assert reconstruction_loss.main(["--recipe", "tiny_PT_DM50", "--data", shards, "--checkpoint",
                                     str(tmp_path / "whole"), "--split", "train", *TINY]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "(8 videos of train, 16 views, 464 masked tokens" in line, line  # 16 x 29: 4 x 4 x 2 tokens, 3 visible


SLOW_CONVERSION = """
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=3))  # a collective may wait 3 s
from trainer import checkpointing
from trainer.engine import DistEnv

def slow(source, target):  # ViT-H's universal checkpoint on a network filesystem: longer than that
    time.sleep(6)
    os.makedirs(target)

checkpointing.convert_to_universal = slow
rank = dist.get_rank()
plan = checkpointing.Checkpointer(sys.argv[1], DistEnv(rank, 2, rank, 2, torch.device("cpu")), 2).resume_plan()
print("plan", plan.tag, plan.universal)
"""


def test_ranks_wait_for_the_universal_conversion_outside_any_collective(tmp_path):
    """Rank 0 converts a checkpoint written by another number of processes; the others used to wait in a barrier,
    which a long conversion outlasts (DeepSpeed's 10-minute timeout): they now wait for the folder to appear."""
    step = tmp_path / "checkpoints" / "step00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "world_size": 3}))
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION.format(root=ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=process_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    for out, err in (p.communicate(timeout=60) for p in procs):
        assert "plan step00000004_universal True" in out, err[-2000:]
