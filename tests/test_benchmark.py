"""tools/benchmark.py: what it writes, and the GPU projection's arithmetic."""

import json

import pytest

from conftest import make_shards
from tools import benchmark
from tools.bench.gpu_projection import projection


def test_json_holds_measurements_ratios_and_machine(tmp_path):
    shards = make_shards(tmp_path, n=4, frames=40)
    out = tmp_path / "bench.json"
    args = ["decode-limit", "--shards", shards, "--batch-size", "2", "--batches", "2", "--reps", "2", "--warmup", "1",
            "--crop-size", "32", "--json", str(out)]
    assert benchmark.main(args) == 0
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["measurements"]]
    assert names == ["decode-limit dali-cpu", "decode-limit pyav"]  # VP9 shards on a CPU: both paths
    for row in report["measurements"]:
        assert row["unit"] == "clips/s" and row["min"] <= row["median"] <= row["max"] and row["peak_mb"] > 0
    assert report["machine"]["cores"] >= 1 and "dali" in report["machine"]
    assert isinstance(report["ratios"], dict) and report["config"]["batches"] == 2
    model = tmp_path / "model.json"
    assert benchmark.main(["model", "--shards", shards, "--model", "vit_tiny", "--model-batch", "2", "--reps", "2",
                           "--json", str(model)]) == 0
    report = json.loads(model.read_text())
    assert 0 < report["ratios"]["model_mfu"] < 1.5  # achieved over the same run's matmul FLOP/s
    rows = {m["name"]: m for m in report["measurements"]}
    assert rows["model vit_tiny step sdpa M=4"]["views_per_clip"] == 4
    assert report["gpu_projection"]["accelerator"] == "H100"


def test_projection_arithmetic():
    p = projection("H100", mfu=0.5, repeats=4)
    vit_l = next(r for r in p["rows"] if r["model"] == "vit_l")
    assert vit_l["train_gflop_per_view"] == pytest.approx(6 * 81.6, rel=0.01)  # 81.6 G multiply-adds per view
    assert vit_l["views_per_s"] == pytest.approx(0.5 * 989e12 / (vit_l["train_gflop_per_view"] * 1e9), rel=0.01)
    assert vit_l["decoded_clips_per_s_needed"] == pytest.approx(vit_l["views_per_s"] / 4, abs=1)
    per_engine = 771 * 1290 / 1860 * (1920 * 1080) / (256 * 341) / (61 + 8)
    assert p["decode_clips_per_s_one_engine"] == pytest.approx(per_engine, abs=1)
    assert p["decode_clips_per_s_all_engines"] == pytest.approx(7 * per_engine, abs=1)
    assert projection("A100", mfu=0.5)["rows"][0]["views_per_s"] < p["rows"][0]["views_per_s"]
