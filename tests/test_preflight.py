"""tools/preflight.py on the CPU, and the first-day GPU failures it and the trainer guard against: a node-local
output folder, a container without NVDEC, the GPU peak table, the version floors, the memory plan."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_shards
from dali_pipes.dali_errors import NVDEC_HELP, first_meaningful_line, nvdec_missing
from models import build_classifier, build_pretrain_model
from models.config import ClassifierConfig, MAEConfig, resolve_config
from models.memory import GB, parameter_count, training_memory
from trainer.device_peak import datasheet_peak
from trainer.memory_plan import plan_recompute
from trainer.recipes import FINETUNE_RECIPES, PRETRAIN_RECIPES
from trainer.versions import FLOORS, version_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preflight_on_a_cpu_passes_what_a_cpu_can_check_and_skips_the_rest(demo_shards, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preflight.py"), "--data", demo_shards,
                             "--recipe", "demo_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
                             "--output", str(out), "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.load(open(out / "preflight.json"))
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"versions": "PASS", "shared folder": "PASS", "all-reduce": "SKIP", "NVDEC": "SKIP",
                      "shards": "PASS", "host decoder": "PASS", "attention": "PASS", "memory": "PASS",
                      "timed run": "PASS"}, result.stdout
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["NVDEC"]["summary"] == "skipped (no GPU)" and "measured: skipped (no GPU)" in checks["memory"][
        "summary"]
    timed = checks["timed run"]["figures"]
    assert timed["clips_per_s_per_gpu"] > 0 and 0 < timed["mfu"] < 1 and timed["decoder"] == "dali-cpu"
    assert "PASS  timed run" in result.stdout and "result: 0 FAIL" in result.stdout
    assert not os.path.exists(out / "preflight_run")  # the timed run's own folder is cleaned up


def test_preflight_fails_with_the_fix_on_a_bad_recipe(demo_shards, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preflight.py"), "--data", demo_shards,
                             "--recipe", "demo_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
                             "--output", str(tmp_path), "model.depth=-1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "FAIL  recipe" in result.stdout and "depth" in result.stdout


SHARED_CHECK = """
import os, sys, torch.distributed as dist
sys.path.insert(0, {root!r})
from trainer.run_folder import NotShared, check_shared
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    check_shared(sys.argv[1] if rank == 0 else sys.argv[2], rank, 2)
    print("shared")
except NotShared as err:
    print("NOT SHARED:", err)
"""


def _two_ranks(folder0, folder1, port):
    script = SHARED_CHECK.format(root=ROOT)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder0), str(folder1)], stdout=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r)}) for r in range(2)]
    return [p.communicate(timeout=120)[0] for p in procs]


def test_a_node_local_output_folder_is_refused_with_the_reason(tmp_path):
    same = _two_ranks(tmp_path / "run", tmp_path / "run", 29811)
    assert all(out.strip() == "shared" for out in same), same
    apart = _two_ranks(tmp_path / "node0", tmp_path / "node1", 29812)  # as /tmp on two nodes
    for out in apart:
        assert "NOT SHARED" in out and "does not see the files of ranks" in out and "shared filesystem" in out
    assert "rank 0" in apart[0] and "rank 1" in apart[0]
    assert os.listdir(tmp_path / "node0" / ".ranks") == []  # tokens are cleaned up


# DALI's text when the driver's video library cannot be loaded (NVIDIA/DALI#2362: a container without the video
# capability), and a decode failure as DALI 2.4 reports it
NVDEC_MISSING = ('Critical error in pipeline:\nError when constructing operator: decoders__Video encountered:\n'
                 '[/opt/dali/dali/operators/video/video_loader.h:182] Assert on "lib_handle_" failed: Failed to load '
                 'libnvcuvid.so, needed by the video decoder.\nCurrent pipeline object is no longer valid.')
DECODE_FAILED = ('Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.video`,\nwhich was used '
                 'in the pipeline definition with the following traceback:\n\n  File "x.py", line 12, in p\n    return '
                 'fn.decoders.video(d)\n\nencountered:\n\nAssert on "frames_decoders_[s]->IsValid()" failed: Failed to '
                 'create video decoder for "memory file"\nC++ context: [/opt/dali/video_decoder_base.h:246] \n'
                 'Current pipeline object is no longer valid.\nCurrent pipeline object is no longer valid.')


def test_dali_errors_are_summarised_and_a_missing_nvdec_is_explained(tmp_path):
    assert first_meaningful_line(DECODE_FAILED) == 'decoders.video: Failed to create video decoder for "memory file"'
    assert nvdec_missing(NVDEC_MISSING) and not nvdec_missing(DECODE_FAILED)
    from dali_pipes import build_pretrain_loader

    loader = build_pretrain_loader(make_shards(tmp_path, n=2), batch_size=2, repeats=1, num_frames=4, crop_size=16)
    with pytest.raises(RuntimeError) as err:  # (the message alone decides: the batch is not even looked at)
        loader.repair.repair(None, RuntimeError(NVDEC_MISSING))
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video" in str(err.value) and "decoder=pyav" in str(err.value)
    assert "Failed to load libnvcuvid.so" in str(err.value)
    assert NVDEC_HELP in str(err.value)


def test_gpu_peaks_match_the_exact_sku():
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
             "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L4": 121e12,
             "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12, "NVIDIA A10": 125e12, "NVIDIA B200": 2250e12}
    for name, peak in cases.items():
        assert datasheet_peak(name)[0] == peak, name
    for unknown in ("NVIDIA A10G", "NVIDIA RTX 6000 Ada Generation", "Tesla V100-SXM2-32GB"):
        assert datasheet_peak(unknown) is None, unknown  # measured instead of guessed


def test_version_floors_are_the_ones_pyproject_declares():
    import re

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    declared = {re.sub(r"-cuda\d+$", "", name): floor for name, floor in re.findall(r'"([\w-]+)>=([\d.]+)"', block)}
    assert declared == FLOORS
    assert version_problems() == []
    problems = version_problems({"torch": "99.0", "nvidia-dali": "99", "not-a-package": "1"})
    assert problems[0].startswith("torch") and "older than 99.0" in problems[0]
    assert "nvidia-dali" in problems[1] and "not-a-package is not installed" in problems[2]


@pytest.mark.parametrize("size", ["vit_tiny", "vit_b"])
def test_the_parameter_count_behind_the_memory_estimate_is_exact(size):
    for model in (build_pretrain_model(size), build_pretrain_model(size, decoder_pos_embed="joint",
                                                                    decoder_cls="encoder"), build_classifier(size)):
        assert parameter_count(model.cfg) == sum(p.numel() for p in model.parameters())


def test_the_memory_plan_recomputes_only_when_it_must():
    recipe = PRETRAIN_RECIPES["k400_VIT_H_16x4_MAE_PT"]
    cfg = resolve_config(MAEConfig, "vit_h")
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2}}
    estimate = training_memory(cfg, 8, 4, world_size=8, accumulation=8)
    assert 8 * GB < estimate.total < 20 * GB  # ViT-H, 8 clips x 4 views per GPU, ZeRO-2 over 8 GPUs
    h100, note = plan_recompute(cfg, recipe, config, 8, 4, capacity=80 * GB)
    assert not h100.grad_checkpointing and "no recompute" in note
    small, note = plan_recompute(cfg, recipe, {**config, "train_micro_batch_size_per_gpu": 16}, 8, 4,
                                 capacity=24 * GB)
    assert small.grad_checkpointing and "recomputing blocks" in note
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan_recompute(cfg, recipe, {**config, "train_micro_batch_size_per_gpu": 64}, 8, 4, capacity=24 * GB)
    by_hand = dataclasses.replace(FINETUNE_RECIPES["k400_VIT_H_16x4_FT"], model_options={"grad_checkpointing": True})
    forced, note = plan_recompute(cfg, by_hand, config, 8, 2, capacity=80 * GB)
    assert "set by the recipe" in note
    cpu, note = plan_recompute(resolve_config(ClassifierConfig, "vit_b"), FINETUNE_RECIPES["k400_VIT_B_16x4_FT"],
                               config, 1, 2, capacity=None)
    assert not cpu.grad_checkpointing and "host memory" in note


def test_ds_configs_accumulate_gradients_in_fp32_and_deepspeed_runs_them(monkeypatch, tmp_path):
    """bf16 keeps 8 mantissa bits: every GPU ds_config accumulates in fp32, and load_ds_config adds it when a config
    accumulates without saying. DeepSpeed 0.19.8 takes it under ZeRO-1, 2 and 3 (checked on the CPU, in bf16)."""
    import deepspeed

    from trainer.engine import init_distributed, load_ds_config

    for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16"):
        assert json.load(open(os.path.join(ROOT, "ds_configs", f"{name}.json")))["data_types"] == {
            "grad_accum_dtype": "fp32"}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    recipe = dataclasses.replace(PRETRAIN_RECIPES["k400_VIT_B_16x4_MAE_PT"], batch_size=None)
    config = load_ds_config(str(bare), recipe, 1, torch.device("cpu"))
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init_distributed()
    for stage in (1, 2, 3):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            **config, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True})
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        for _ in range(4):  # two optimizer steps of two micro-batches
            x = torch.randn(2, 8, dtype=torch.bfloat16)
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
        assert engine.global_steps == 2, stage
        if stage < 3:  # (ZeRO-3 partitions the parameters away from the module)
            assert any(not torch.equal(a, b.detach().float()) for a, b in zip(before, engine.module.parameters()))


def test_the_shards_check_knows_what_nvdec_decodes_and_what_hd_costs(tmp_path):
    from tools.checks.preflight import check_shards

    def manifest(formats, short_side):
        (tmp_path / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {"train": {
            "samples": sum(formats.values()), "codecs": {f.split("/")[0]: n for f, n in formats.items()},
            "formats": formats, "shards": [{}], "pixels_median": short_side * short_side * 16 // 9,
            "short_side": {"min": short_side, "median": short_side, "max": short_side,
                           "above_320": sum(formats.values()) if short_side > 320 else 0}}}}))
        return str(tmp_path)

    gpu = torch.device("cuda")
    good = check_shards(manifest({"h264/yuv420p": 90, "vp9/yuv420p10le": 10}, 256), "train", "dali-gpu", gpu, None, 4)
    assert good.status == "PASS"
    bad = check_shards(manifest({"h264/yuv420p": 90, "h264/yuv444p": 3}, 256), "train", "dali-gpu", gpu, None, 4)
    assert bad.status == "FAIL" and "h264/yuv444p" in bad.summary and "--codec h264" in bad.fix
    hd = check_shards(manifest({"h264/yuv420p": 5}, 1080), "train", "dali-gpu", gpu, 1200.0, 4)
    assert hd.status == "WARN" and "projected NVDEC H.264 decode ~" in hd.summary and "needs ~300" in hd.summary
    assert hd.figures["projected_nvdec_clips_per_s_per_engine"] < 60  # 1080p costs ~18x the pixels of 256p
    cpu = check_shards(manifest({"hevc/yuv420p": 5}, 256), "train", "dali-cpu", torch.device("cpu"), None, 4)
    assert cpu.status == "FAIL" and "decoder=pyav" in cpu.fix
