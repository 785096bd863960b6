"""tools/benchmark.py: measurements taken in turns, ratios round by round, what it writes, and the GPU projection's
arithmetic."""

import json

import pytest

from conftest import make_shards
from tools import benchmark
from tools.bench.gpu_projection import projection


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path, n=4, frames=40)


@pytest.mark.long
def test_loader_contenders_take_turns_and_ratios_are_per_round(shards, tmp_path):
    out = tmp_path / "bench.json"
    args = ["loader", "--shards", shards, "--batch-size", "2", "--batches", "2", "--warmup", "1", "--rounds", "3",
            "--crop-size", "32", "--json", str(out)]
    assert benchmark.main(args) == 0
    report = json.loads(out.read_text())
    rows = {m["name"]: m for m in report["measurements"]}
    assert set(rows) == {f"loader {d} R={r}" for d in ("dali-cpu", "pyav") for r in (1, 2, 4)}
    for row in rows.values():
        assert row["unit"] == "clips/s" and len(row["rounds"]) == 3 and row["peak_mb"] > 0
        assert row["min"] <= row["median"] <= row["max"]
    ratio = report["ratios"]["r4_vs_r1_views"]
    by_round = sorted(4 * a / b for a, b in zip(rows["loader dali-cpu R=4"]["rounds"],
                                               rows["loader dali-cpu R=1"]["rounds"]))
    assert ratio["rounds"] == 3 and ratio["median"] == pytest.approx(by_round[1], abs=5e-4)  # median of the rounds'
    assert ratio["min"] == pytest.approx(by_round[0], abs=5e-4) and ratio["max"] == pytest.approx(by_round[2], abs=5e-4)
    assert {"busy_share", "loadavg_1min"} <= set(report["load"]["before"]) and report["machine"]["cores"] >= 1


@pytest.mark.long
def test_model_contenders_take_turns_with_their_ratios_mfu_and_decoder_masking(shards, tmp_path):
    model = tmp_path / "model.json"
    assert benchmark.main(["model", "--shards", shards, "--model", "vit_tiny", "--model-batch", "2", "--rounds", "2",
                           "--json", str(model)]) == 0
    report = json.loads(model.read_text())
    mfu = report["ratios"]["model_mfu"]
    assert 0 < mfu["min"] <= mfu["median"] <= mfu["max"] < 1.5  # each round over its own matmul peak
    rows = {m["name"]: m for m in report["measurements"]}
    assert rows["model vit_tiny step sdpa M=4"]["views_per_clip"] == 4
    fused = sorted(a / b for a, b in zip(rows["model vit_tiny step sdpa M=1"]["rounds"],
                                         rows["model vit_tiny step sdpa M=1 foreach AdamW"]["rounds"]))
    assert report["ratios"]["model_fused_vs_foreach_adamw"]["min"] == pytest.approx(fused[0], abs=5e-4)
    assert {"model_sdpa_vs_math", "model_m4_vs_m1_views"} <= set(report["ratios"])
    # decoder masking: the step at keep 0.5 and 0.25 beside keep 1, a time ratio per round, the analytic FLOPs
    slower = sorted(a / b for a, b in zip(rows["model vit_tiny step sdpa M=1"]["rounds"],
                                          rows["model vit_tiny step sdpa M=1 keep=0.5"]["rounds"]))
    assert report["ratios"]["model_step_time_keep_0.5_vs_1"]["min"] == pytest.approx(slower[0], abs=5e-4)
    assert "model_step_time_keep_0.25_vs_1" in report["ratios"]
    flops = report["decoder_masking"]["flops_vs_keep_1"]
    assert flops["vit_l"]["0.5"] <= 0.82 and flops["vit_b"]["0.25"] < flops["vit_b"]["0.5"] < 1
    assert set(report["decoder_masking"]["peak_mb"]) == {"1.0", "0.5", "0.25"}
    assert list(rows["model vit_tiny parts sdpa M=1"]["parts"]) == [
        "embed + encoder", "decoder", "loss (targets included)", "backward", "optimizer"]
    assert report["gpu_projection"]["accelerator"] == "H100 SXM"


def test_stages_and_decode_limit_run_and_report(shards, tmp_path):
    out = tmp_path / "stages.json"
    small = ["--shards", shards, "--batch-size", "2", "--batches", "1", "--warmup", "1", "--rounds", "1",
             "--crop-size", "32"]
    assert benchmark.main(["stages", *small, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {m["name"]: m for m in report["measurements"]}
    for r in (1, 4):
        stages = rows[f"stages dali-cpu R={r}"]["stages"]
        assert list(stages) == ["decode", "decode + resize", "views pipeline", "views + copy to torch"]
        assert all(seconds > 0 for seconds in stages.values())
    assert report["stage_costs"]["decode_s_per_batch"] > 0 and report["stage_costs"]["ceiling_r4_vs_r1_views"] > 0
    assert benchmark.main(["decode-limit", *small, "--json", str(out)]) == 0
    rows = {m["name"]: m for m in json.loads(out.read_text())["measurements"]}
    assert {"decode-limit dali-cpu", "decode-limit pyav"} <= set(rows)
    assert all(rows[name]["median"] > 0 for name in ("decode-limit dali-cpu", "decode-limit pyav"))


def test_per_round_ratio():
    rows = {"a": {"rounds": [10.0, 20.0, 30.0], "views_per_clip": 4}, "b": {"rounds": [10.0, 10.0, 20.0],
                                                                             "views_per_clip": 1}}
    assert benchmark.per_round_ratio(rows, "a", "b") == {"median": 1.5, "min": 1.0, "max": 2.0, "rounds": 3}
    assert benchmark.per_round_ratio(rows, "a", "b", views=True)["median"] == 6.0
    assert benchmark.per_round_ratio(rows, "a", "missing") is None


def test_projection_arithmetic():
    p = projection("H100 SXM", mfu=0.5, repeats=4)
    vit_l = next(r for r in p["rows"] if r["model"] == "vit_l")
    assert vit_l["train_gflop_per_view"] == pytest.approx(6 * 81.6, rel=0.01)  # 81.6 G multiply-adds per view
    assert vit_l["views_per_s"] == pytest.approx(0.5 * 989e12 / (vit_l["train_gflop_per_view"] * 1e9), rel=0.01)
    assert vit_l["decoded_clips_per_s_needed"] == pytest.approx(vit_l["views_per_s"] / 4, abs=1)
    per_engine = 771 * 1290 / 1860 * (1920 * 1080) / (256 * 341) / (61 + 8)
    assert p["decode_clips_per_s_one_engine"] == pytest.approx(per_engine, abs=1)
    assert p["decode_clips_per_s_all_engines"] == pytest.approx(7 * per_engine, abs=1)
    assert projection("A100", mfu=0.5)["rows"][0]["views_per_s"] < p["rows"][0]["views_per_s"]


def test_two_trainers_at_once_are_measured_against_each_alone(shards, tmp_path):
    """The share mode: two real trainers, phases in rotated rounds, each one's rate at once over its rate alone."""
    out = tmp_path / "share.json"
    tiny = "crop_size=32 model.img_size=32 num_frames=4 model.num_frames=4 model.pred_t_dim=2 model.depth=1"
    assert benchmark.main(["share", "--shards", shards, "--rounds", "2", "--share-steps", "3", "--batch-size", "2",
                           "--e2e-overrides", tiny, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {m["name"]: m for m in report["measurements"]}
    assert set(rows) == {f"share trainer {t} {phase}" for t in "AB" for phase in ("alone", "both")}
    for name in "AB":
        per_round = sorted(b / a for a, b in zip(rows[f"share trainer {name} alone"]["rounds"],
                                                 rows[f"share trainer {name} both"]["rounds"]))
        ratio = report["ratios"][f"share_{name}_at_once_vs_alone"]  # (rounded to 3 decimals)
        assert ratio["rounds"] == 2 and ratio["min"] == pytest.approx(per_round[0], abs=5e-4) and ratio["min"] > 0


OPENMP_AT_TORCHS_IMPORT = """
import builtins, os, runpy, sys
real_import = builtins.__import__

def watch(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules:
        print("at torch's import:", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME"), flush=True)
    return real_import(name, *args, **kwargs)

builtins.__import__ = watch
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("entry", ["trainer/pretrain.py", "trainer/finetune.py", "tools/benchmark.py"])
def test_entry_points_set_how_openmp_threads_wait_before_torch_loads(entry):
    """GNU OpenMP's idle threads spun some 300,000 times before sleeping: two demo pretrainings on 2 cores ran at
    0.11 of their speed alone, each (tools/benchmark.py share). The spin count is set before torch loads OpenMP,
    which reads it once."""
    import os
    import subprocess
    import sys

    from conftest import process_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in process_env().items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    result = subprocess.run([sys.executable, "-c", OPENMP_AT_TORCHS_IMPORT, os.path.join(root, entry)],
                            capture_output=True, text=True, env=env, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at torch's import: 1000 1" in result.stdout, result.stdout[:2000]
