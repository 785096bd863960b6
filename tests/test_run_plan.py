"""What a run plans before it starts: the installed versions against their floors, the device's peak, the parameter
count and memory estimate, the memory plan (recompute or not), the ds_configs' gradient accumulation."""

import dataclasses
import json
import os

import pytest
import torch

from models import build_classifier, build_pretrain_model
from models.config import ClassifierConfig, MAEConfig, resolve_config
from models.memory import GB, parameter_count, training_memory
from trainer.device_peak import datasheet_peak
from trainer.memory_plan import plan_recompute
from trainer.recipes import FINETUNE_RECIPES, PRETRAIN_RECIPES
from trainer.versions import FLOORS, version_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    from trainer.ds_config import BatchPlan, DsConfig
    from trainer.memory_plan import runtime_reserve

    recipe = PRETRAIN_RECIPES["k400_VIT_H_16x4_MAE_PT"]
    cfg = resolve_config(MAEConfig, "vit_h")
    config = DsConfig("zero2.json", {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
                                     "zero_optimization": {"stage": 2, "overlap_comm": True,
                                                           "reduce_bucket_size": 25_000_000}})
    batch = BatchPlan(8, 8, 8)
    estimate = training_memory(cfg, 8, 4, world_size=8, accumulation=8)
    assert 8 * GB < estimate.total < 20 * GB  # ViT-H, 8 clips x 4 views per GPU, ZeRO-2 over 8 GPUs
    h100, note = plan_recompute(cfg, recipe, config, batch, 4, capacity=80 * GB)
    assert not h100.grad_checkpointing and "no recompute" in note and "dali" in note and "nccl" in note
    small, note = plan_recompute(cfg, recipe, config, BatchPlan(16, 4, 8), 4, capacity=24 * GB)
    assert small.grad_checkpointing and "recomputing blocks" in note
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan_recompute(cfg, recipe, config, BatchPlan(64, 1, 8), 4, capacity=24 * GB)
    fine_tuning = FINETUNE_RECIPES["k400_VIT_H_16x4_FT"]
    by_hand = dataclasses.replace(fine_tuning, model=dataclasses.replace(fine_tuning.model,
                                                                         options={"grad_checkpointing": True}))
    forced, note = plan_recompute(cfg, by_hand, config, batch, 2, capacity=80 * GB)
    assert "set by the recipe" in note
    cpu, note = plan_recompute(resolve_config(ClassifierConfig, "vit_b"), FINETUNE_RECIPES["k400_VIT_B_16x4_FT"],
                               config, BatchPlan(8, 1, 1), 2, capacity=None)
    assert not cpu.grad_checkpointing and "host memory" in note
    # what the GPU holds beside the model, counted by what holds it instead of a flat 6 GB
    reserve = runtime_reserve(recipe, config, batch, 4, frame_pixels=256 * 341)
    assert reserve["deepspeed_buckets"] == 25_000_000 * 2 * 2 + 500_000_000 * 2  # two reduce buckets, one gather
    assert reserve["nccl"] == 32 * 2 * 2 * 4 * 2**20
    views = 4 * 3 * 16 * 224 * 224 * 2  # bf16
    assert reserve["dali"] == 4 * 2 * 8 * (16 * 256 * 341 * 3 + views) and reserve["loader_batches"] == 2 * 8 * views
    assert "nccl" not in runtime_reserve(recipe, config, BatchPlan(8, 8, 1), 4)  # one process: no communicator


def test_zero1s_bf16_optimizer_is_counted_with_its_whole_fp32_gradients():
    """ds_configs/zero1_bf16.json runs DeepSpeed's BF16_Optimizer, which keeps an unpartitioned fp32 copy of every
    gradient and all-reduces it through a flat copy of up to 500 M elements: the estimate counted none of it."""
    from trainer.ds_config import BatchPlan, read_ds_config
    from trainer.memory_plan import estimate, runtime_reserve

    recipe = PRETRAIN_RECIPES["k400_VIT_H_16x4_MAE_PT"]
    zero1, zero2 = (read_ds_config(os.path.join(ROOT, "ds_configs", f"zero{n}_bf16.json"), recipe) for n in (1, 2))
    assert zero1.bf16_optimizer(1) and not zero2.bf16_optimizer(8)
    cfg, batch = resolve_config(MAEConfig, "vit_h"), BatchPlan(8, 1, 64)  # the paper's 512 clips on 64 GPUs
    params = parameter_count(cfg)
    assert estimate(cfg, recipe, zero1, batch, 4, False).gradients == 2 * params + 4 * params + 4 * 500_000_000
    assert estimate(cfg, recipe, zero2, batch, 4, False).gradients == 2 * params / 64
    assert "deepspeed_buckets" not in runtime_reserve(recipe, zero1, batch, 4)  # (reduce_bucket_size is ignored)


def test_ds_configs_accumulate_gradients_in_fp32_and_deepspeed_runs_them(monkeypatch, tmp_path):
    """bf16 keeps 8 mantissa bits: every GPU ds_config accumulates in fp32, and the trainer adds it when a config
    accumulates without saying. DeepSpeed 0.19.8 takes it under ZeRO-1, 2 and 3 (checked on the CPU, in bf16)."""
    import deepspeed

    from trainer.ds_config import plan_batch, read_ds_config
    from trainer.engine import init_distributed

    for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16"):
        assert json.load(open(os.path.join(ROOT, "ds_configs", f"{name}.json")))["data_types"] == {
            "grad_accum_dtype": "fp32"}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    paper = PRETRAIN_RECIPES["k400_VIT_B_16x4_MAE_PT"]
    recipe = dataclasses.replace(paper, optim=dataclasses.replace(paper.optim, batch_size=None))
    config = read_ds_config(str(bare), recipe).for_deepspeed(recipe, plan_batch(None, 2, 1, 2))
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

