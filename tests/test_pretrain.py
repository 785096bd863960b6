"""trainer/pretrain.py on the CPU: 1 and 2 processes, ZeRO-2 and ZeRO-3, kill -9 and resume, a different number of
processes, TensorBoard, the loss guard and the config checks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_shards
from models import build_classifier, load_pretrained
from trainer import pretrain
from trainer.engine import ConfigConflict, load_ds_config, warmup_cosine
from trainer.monitor import LossGuard
from trainer.recipes import PRETRAIN_RECIPES, resolve_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "trainer", "pretrain.py")
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "loader_threads=1", "image_every=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("pt"), n=8, frames=40)


def ds_config(folder, stage, micro=2):
    path = os.path.join(folder, f"zero{stage}.json")
    with open(path, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                   "bf16": {"enabled": False}, "zero_optimization": {"stage": stage}}, f)
    return path


def command(processes, config, data, output, *extra, port=29700):
    if processes == 1:
        return [sys.executable, SCRIPT, "--ds_config", config, "--recipe", "demo_PT", "--data", data,
                "--output", output, *TINY, *extra]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(processes),
            "--master_port", str(port), SCRIPT, "--ds_config", config, "--recipe", "demo_PT", "--data", data,
            "--output", output, *TINY, *extra]


def losses(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def run(cmd, timeout=300):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ,
                                                                                       "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_one_process_learns_and_writes_everything(shards, tmp_path):
    out = str(tmp_path / "run")
    text = run(command(1, ds_config(tmp_path, 2, micro=4), shards, out, "--max-steps", "60", "blr=0.05",
                       "warmup_epochs=1", "epochs=40", "checkpoint_every=30"))
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
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 61, 5))  # demo_PT: log_every 5
    assert os.path.exists(os.path.join(out, "pictures", "reconstruction_step00000060.png"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["clips_per_step"] == 4 and config["lr"] == pytest.approx(0.05 * 4 / 256)
    # the fp32 export is mae_st's format, and fine-tuning takes its encoder
    classifier = build_classifier("vit_tiny", num_classes=3, img_size=32, num_frames=4, embed_dim=64)
    report = load_pretrained(classifier, os.path.join(out, "export", "mae_st_pretrain.pth"))
    assert report.source_format == "mae_st" and report.fresh == ["head.weight", "head.bias"]


@pytest.mark.parametrize("stage", [2, 3])
def test_kill_and_resume_continues_with_the_same_losses(shards, tmp_path, stage):
    config = ds_config(tmp_path, stage)
    reference = str(tmp_path / "reference")
    run(command(2, config, shards, reference, "--max-steps", "10", "checkpoint_every=2", port=29710 + stage))
    killed = str(tmp_path / "killed")
    cmd = command(2, config, shards, killed, "--max-steps", "10", "checkpoint_every=2", port=29720 + stage)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(latest) and open(latest).read() >= "step00000004"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "export")), "the kill should land before the end"
    resumed_from = open(latest).read()
    text = run(cmd)
    assert f"resumed from {resumed_from}" in text
    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    if stage == 3:  # and on one process: through DeepSpeed's universal checkpoint
        text = run(command(1, config, shards, killed, "--max-steps", "12", "batch_size=2"))
        assert "universal" in text and "done: 12 steps" in text


def _nan_at_step_3(self, engine, batch, recipe):
    loss, outputs = original_loss(self, engine, batch, recipe)
    if engine.global_steps == 2:
        loss = loss * float("nan")
    return loss, outputs


original_loss = pretrain.Pretraining.loss


def test_guard_stops_on_a_nan_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pretrain.Pretraining, "loss", _nan_at_step_3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "run")
    args = ["--ds_config", ds_config(tmp_path, 2), "--recipe", "demo_PT", "--data", shards, "--output", out, *TINY,
            "checkpoint_every=1", "--max-steps", "6"]
    assert pretrain.main(pretrain.Pretraining(), args) == 3
    assert "stopping at step 3: the loss is nan" in caplog.text
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step00000002"
    assert not os.path.exists(os.path.join(out, "checkpoints", "step00000003"))


def test_loss_guard_rules():
    guard = LossGuard()
    assert all(guard.check(v) is None for v in (1.0, 0.9, 0.8, 0.8, 0.7, 1.5))  # 1.5 < 2 x 0.84
    assert "jumped to 3.0000" in guard.check(3.0)
    assert "inf" in guard.check(float("inf"))


def test_config_conflicts_are_explained_in_one_message(tmp_path):
    recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_L_16x4_MAE_PT", [])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                                "optimizer": {"type": "Adam"}, "fp16": {"enabled": True}, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigConflict) as err:
        load_ds_config(str(path), recipe, 8, torch.device("cpu"))
    message = str(err.value)
    for phrase in ("not train_batch_size", "remove the 'optimizer' section", "fp16 is not supported",
                   "gradient_clipping is 1.0 here but clip_grad is 0.02",
                   "512 clips per step, this ds_config on 8 per process x 1 accumulation x 8 processes = 64: set "
                   "gradient_accumulation_steps to 8, or override batch_size=64"):
        assert phrase in message, phrase
    good = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2_bf16.json"), recipe, 64, torch.device("cpu"))
    assert good["gradient_clipping"] == 0.02


def test_shipped_ds_configs_fit_the_recipes():
    for name, world in (("zero1_bf16", 64), ("zero2_bf16", 64), ("zero3_bf16", 64), ("cpu", 1)):
        recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_H_16x4_MAE_PT" if name != "cpu" else "demo_PT", [])
        load_ds_config(os.path.join(ROOT, "ds_configs", f"{name}.json"), recipe, world, torch.device("cpu"))


def test_recipe_overrides_and_schedule():
    recipe = resolve_recipe(PRETRAIN_RECIPES, "k400_VIT_B_16x4_MAE_PT",
                            ["blr=1e-3", "epochs=10", "decoder=pyav", "model.drop_path_rate=0.1", "betas=(0.9, 0.99)"])
    assert (recipe.blr, recipe.epochs, recipe.decoder, recipe.betas) == (1e-3, 10.0, "pyav", (0.9, 0.99))
    assert recipe.model_options == {"norm_pix_loss": True, "drop_path_rate": 0.1}
    with pytest.raises(ValueError, match="unknown recipe field 'lr_peak'"):
        resolve_recipe(PRETRAIN_RECIPES, "demo_PT", ["lr_peak=1"])
    with pytest.raises(ValueError, match="expected a int"):
        resolve_recipe(PRETRAIN_RECIPES, "demo_PT", ["repeats=two"])
    assert [round(warmup_cosine(s, 10, 110, 0.0), 3) for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
