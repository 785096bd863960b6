"""tools/preflight.py on the CPU, and the first-day GPU failures it and the trainer guard against: a node-local
output folder, a container without NVDEC, failing or missing ranks, the network (what a run plans before it starts:
tests/test_run_plan.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port, make_shards, process_env
from dali_pipes.dali_errors import NVDEC_HELP, first_meaningful_line, nvdec_missing
from models.config import MAEConfig, resolve_config
from models.memory import GB
from tools import preflight
from trainer.recipes import PRETRAIN_RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preflight_here(capsys, *args) -> tuple[int, str]:
    """tools/preflight.py with `args`, run in this process (a process start costs about 5 s here): its exit code and
    what it printed."""
    capsys.readouterr()
    code = preflight.main(list(args))
    return code, capsys.readouterr().out


def test_preflight_on_a_cpu_passes_what_a_cpu_can_check_and_skips_the_rest(demo_shards, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout = preflight_here(capsys, "--data", demo_shards, "--recipe", "tiny_PT", "--ds_config",
                                  os.path.join(ROOT, "ds_configs", "cpu.json"), "--output", str(out), "--steps", "8")
    assert code == 0, stdout[-3000:]
    report = json.load(open(out / "preflight.json"))
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"versions": "PASS", "shared folder": "PASS", "all-reduce": "SKIP", "shard store": "SKIP",
                      "NVDEC": "SKIP", "shards": "PASS", "host decoder": "PASS", "attention": "PASS", "memory": "PASS",
                      "timed run": "PASS"}, stdout
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["NVDEC"]["summary"] == "skipped (no GPU)" and "measured: skipped (no GPU)" in checks["memory"][
        "summary"]
    timed = checks["timed run"]["figures"]
    assert timed["clips_per_s_per_gpu"] > 0 and 0 < timed["mfu"] < 1 and timed["decoder"] == "dali-cpu"
    assert "PASS  timed run" in stdout and "result: 0 FAIL" in stdout
    assert not os.path.exists(out / "preflight_run")  # the timed run's own folder is cleaned up


def test_preflight_checks_each_set_of_a_mixture_by_name(demo_shards, tmp_path, capsys):
    out = tmp_path / "run"
    data = f"k400={demo_shards}:0.7,other={make_shards(tmp_path / 'other', n=8, frames=40)}:0.3:stride=2"
    code, stdout = preflight_here(capsys, "--data", data, "--recipe", "tiny_PT", "--ds_config",
                                  os.path.join(ROOT, "ds_configs", "cpu.json"), "--output", str(out), "--steps", "2")
    assert code == 0, stdout[-3000:]
    checks = {c["name"]: c for c in json.load(open(out / "preflight.json"))["checks"]}
    assert [name for name in checks if name.startswith("shard")] == ["shard store k400", "shard store other",
                                                                      "shards k400", "shards other"]
    assert "12 train clips" in checks["shards k400"]["summary"] and "8 train clips" in checks["shards other"][
        "summary"]
    # WARN is a fair verdict here: two steps, each set's pipeline starting on its first batch, may wait for data
    assert checks["timed run"]["status"] in ("PASS", "WARN") and checks["timed run"]["figures"]["steps"] == 2


def test_preflight_fails_with_the_fix_on_a_bad_recipe(demo_shards, tmp_path):
    """...naming every bad option, and writing nothing into the folder it was started from when --output does not
    exist yet (preflight.json landed in the current folder)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preflight.py"), "--data", demo_shards,
                             "--recipe", "tiny_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
                             "--output", str(tmp_path / "not_yet"), "model.depth=-1", "repeats=0"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "FAIL  recipe" in result.stdout
    assert "depth=-1" in result.stdout and "repeats=0" in result.stdout
    assert os.listdir(tmp_path) == []


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


def _two_ranks(folder0, folder1):
    script, port = SHARED_CHECK.format(root=ROOT), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder0), str(folder1)], stdout=subprocess.PIPE,
                              text=True, env=process_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                                         MASTER_PORT=port)) for r in range(2)]
    return [p.communicate(timeout=120)[0] for p in procs]


def test_a_node_local_output_folder_is_refused_with_the_reason(tmp_path):
    same = _two_ranks(tmp_path / "run", tmp_path / "run")
    assert all(out.strip() == "shared" for out in same), same
    apart = _two_ranks(tmp_path / "node0", tmp_path / "node1")  # as /tmp on two nodes
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


def test_dali_errors_are_summarised_and_a_missing_nvdec_is_explained(tmp_path, monkeypatch):
    assert first_meaningful_line(DECODE_FAILED) == 'decoders.video: Failed to create video decoder for "memory file"'
    assert nvdec_missing(NVDEC_MISSING) and not nvdec_missing(DECODE_FAILED)
    from nvidia.dali.pipeline import Pipeline

    from dali_pipes import build_pretrain_loader
    from dali_pipes.dali_errors import NvdecUnavailable

    loader = build_pretrain_loader(make_shards(tmp_path, n=2), batch_size=2, repeats=1, num_frames=4, crop_size=16)

    def no_nvdec(self):
        raise RuntimeError(NVDEC_MISSING)

    monkeypatch.setattr(Pipeline, "share_outputs", no_nvdec)
    with pytest.raises(NvdecUnavailable) as err:  # the message alone decides: no clip-by-clip repair
        next(iter(loader))
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video" in str(err.value) and "decoder=pyav" in str(err.value)
    assert "Failed to load libnvcuvid.so" in str(err.value) and NVDEC_HELP in str(err.value)
    assert loader.skipped == 0
    loader.close()










def test_the_figures_a_gpu_run_reports_are_its_own(monkeypatch):
    """The MFU of an fp32 run was against bf16's tensor-core peak; the timed run projected an H100 NVL or PCIe with
    the SXM part's peak and called an H200 "H100"; the memory check held a micro-batch against the whole GPU,
    ignoring what the CUDA context, NCCL, DeepSpeed's buckets and DALI hold beside it."""
    from tools.bench.gpu_projection import accelerator_for
    from tools.checks import model
    from trainer import device_peak, memory_plan
    from trainer.ds_config import BatchPlan, read_ds_config

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_peak, "measured_matmul_peak", lambda device, dtype, seconds=0.3: 51e12)
    for name, sku in (("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 NVL", "H100 NVL"),
                      ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA L4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert accelerator_for(gpu) == sku, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak.device_peak_flops(gpu, torch.bfloat16)[0] == 989e12
    peak, source = device_peak.device_peak_flops(gpu, torch.float32)
    assert peak == 51e12 and "measured torch.float32 matmul (the datasheet table holds bf16's peak)" in source
    # ViT-H, 8 clips x 4 views per GPU, ZeRO-2 over 8 H100s: a micro-batch of 71 GB fits 80 GB but not what is left
    recipe = PRETRAIN_RECIPES["k400_VIT_H_16x4_MAE_PT"]
    ds = read_ds_config(os.path.join(ROOT, "ds_configs", "zero2_bf16.json"), recipe)
    cfg, batch = resolve_config(MAEConfig, "vit_h"), BatchPlan(8, 8, 8)
    monkeypatch.setattr(memory_plan, "device_capacity", lambda device: 80 * GB)
    for measured, status in ((71 * GB, "FAIL"), (40 * GB, "PASS")):
        monkeypatch.setattr(model, "measure_micro_batch", lambda *args, measured=measured: measured)
        check = model.check_memory(cfg, recipe, ds, batch, gpu, 4, 256 * 341)
        assert check.status == status and check.figures["reserve_gb"] > 3, check.summary
    assert "usable beside the runtime's" in check.summary and "dali" in check.summary






def test_the_shards_check_knows_what_nvdec_decodes_on_this_gpu_and_what_hd_costs(tmp_path):
    from dali_pipes.decoders import choose_route
    from tools.checks.decoding import check_shards

    def manifest(formats, short_side):
        (tmp_path / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {"train": {
            "samples": sum(formats.values()), "codecs": {f.split("/")[0]: n for f, n in formats.items()},
            "formats": formats, "shards": [{}], "pixels_median": short_side * short_side * 16 // 9,
            "short_side": {"min": short_side, "median": short_side, "max": short_side,
                           "above_320": sum(formats.values()) if short_side > 320 else 0}}}}))
        return str(tmp_path), choose_route("auto", formats, (9, 0))  # an H100

    gpu = torch.device("cuda")
    data, route = manifest({"h264/yuv420p": 90, "vp9/yuv420p10le": 10}, 256)
    assert check_shards(data, "train", route, gpu, None, 4).status == "PASS"
    data, route = manifest({"h264/yuv420p": 90, "av1/yuv420p": 10}, 256)
    av1 = check_shards(data, "train", route, gpu, None, 4)
    assert av1.status == "WARN" and "NVDEC cannot decode av1/yuv420p (10 clips): 10.0% of the clips decode on the " \
        "host with pyav" in av1.summary and "--codec h264" in av1.fix and av1.figures["host_decoded_share"] == 0.1
    data, route = manifest({"h264/yuv420p": 5}, 1080)
    hd = check_shards(data, "train", route, gpu, 1200.0, 4)
    assert hd.status == "WARN" and "projected NVDEC H.264 decode ~" in hd.summary and "needs ~300" in hd.summary
    assert hd.figures["projected_nvdec_clips_per_s_per_engine"] < 60  # 1080p costs ~18x the pixels of 256p


def test_the_preflight_decodes_a_probe_of_every_codec_with_the_decoder_it_gets_here():
    """The decoders check probes each codec of the shards through the decoder the loader's route gives it: on an
    H100 the AV1 clips go to PyAV (its NVDEC has no AV1), so that is what is probed for them."""
    from dali_pipes.decoders import choose_route
    from tools.checks.decoding import check_decoders, decoder_assignments

    cpu = torch.device("cpu")
    formats = {"vp9/yuv420p": 10, "h264/yuv420p": 3}
    nvdec, host = check_decoders(choose_route("auto", formats, None), formats, cpu)
    assert nvdec.status == "SKIP" and host.status == "PASS", host
    assert "vp9/yuv420p 342x256 (dali-cpu), h264/yuv420p 342x256 (pyav)" in host.summary  # (no size: Kinetics')
    on_h100 = choose_route("auto", {"h264/yuv420p": 8, "av1/yuv420p10le": 2}, (9, 0))
    assigned = {codec: (decoder.name, pix) for codec, (decoder, pix) in decoder_assignments(
        on_h100, on_h100.host_formats | {"h264/yuv420p": 8}).items()}
    assert assigned == {"h264": ("dali-gpu", "yuv420p"), "av1": ("pyav", "yuv420p10le")}
    _, host = check_decoders(on_h100, {"h264/yuv420p": 8, "av1/yuv420p10le": 2}, cpu)
    assert host.status == "PASS" and "av1/yuv420p10le 342x256 (pyav)" in host.summary


def test_probe_clips_are_made_at_the_shards_median_size_and_at_least_nvdecs_minimum():
    """The probe was 128x96, below what NVDEC decodes of HEVC (144x144) and VP9 (128x128): the NVDEC check failed on a
    healthy GPU for VP9 or HEVC shards, and the timed run was skipped."""
    from dali_pipes.decoders import choose_route
    from tools.checks.decoding import check_decoders, probe_size, shards_frame

    frame = shards_frame({"short_side": {"min": 240, "median": 256, "max": 320}, "pixels_median": 256 * 341})
    assert frame == (341, 256) and probe_size("h264", frame) == (342, 256)  # (even sides)
    assert probe_size("hevc", (128, 96)) == (144, 144) and probe_size("vp9", (128, 96)) == (128, 128)
    assert probe_size("av1", None) == (342, 256) and shards_frame({"short_side": {}}) is None  # (an old manifest)
    formats = {"vp9/yuv420p": 2}
    _, host = check_decoders(choose_route("auto", formats, None), formats, torch.device("cpu"), (640, 360))
    assert host.status == "PASS" and "vp9/yuv420p 640x360 (dali-cpu)" in host.summary


FAILING_RANK = """
import os, sys
sys.path.insert(0, {root!r})
from trainer import run_folder
if os.environ["RANK"] == "1":  # a read-only mount on this rank's node
    def refuse(path):
        raise PermissionError(13, "Permission denied", path)
    run_folder.write_token = refuse
from tools import preflight
sys.exit(preflight.main(sys.argv[1:]))
"""


def test_a_check_that_raises_on_one_rank_is_a_fail_naming_it_not_a_hang(tmp_path):
    """Rank 1 cannot write into the run folder: it used to skip the barrier the others waited in, and the job hung
    for the process group's 10 minutes. Every rank now takes every collective and the FAIL names rank 1."""
    import time

    shards = make_shards(tmp_path, n=4, frames=20)
    args = ["--data", shards, "--recipe", "tiny_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
            "--output", str(tmp_path / "run"), "--timeout", "60"]
    start = time.time()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FAILING_RANK.format(root=ROOT), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=process_env(
                                  RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert time.time() - start < 60, outputs[0][-3000:]
    assert [p.returncode for p in procs] == [1, 1], outputs[0][-3000:]
    report = outputs[0]
    assert "FAIL  shared folder" in report and "rank 1 on" in report and "cannot write there: PermissionError" in report
    assert "timed run     not run: a check failed on ranks [0, 1]" in report
    assert json.load(open(tmp_path / "run" / "preflight.json"))["counts"]["FAIL"] >= 1


FAILS_INSIDE_THE_ALL_REDUCE = """
import os, sys
sys.path.insert(0, {root!r})
from tools.checks import environment
if os.environ["RANK"] == "1":  # a network adapter that fails NCCL's transport on this rank's node
    def broken(*args, **kwargs):
        raise RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG)")
    environment._bus_bandwidth = broken
from tools import preflight
code = preflight.main(sys.argv[1:])
print("NCCL waits:", os.environ.get("TORCH_NCCL_BLOCKING_WAIT"), os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
sys.exit(code)
"""


def test_a_rank_failing_inside_the_all_reduce_is_named_in_the_report(tmp_path):
    """With torch's default NCCL error handling a failed or timed-out collective tears the process down: nobody
    reported, and not at all when rank 0 was among the aborted. The preflight waits on NCCL blocking (errors raise
    where they happen), its groups time out at --timeout, and the report names the rank that failed and the ones
    that waited for it."""
    shards = make_shards(tmp_path, n=4, frames=20)
    args = ["--data", shards, "--recipe", "tiny_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"),
            "--output", str(tmp_path / "run"), "--timeout", "3"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FAILS_INSIDE_THE_ALL_REDUCE.format(root=ROOT), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=process_env(
                                  RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs[0][-3000:]
    report = outputs[0]
    line = next(line for line in report.splitlines() if line.startswith("FAIL  all-reduce"))
    assert "ranks [1]: RuntimeError: NCCL error in" in line and "ranks [0] waited for them" in line, report[-3000:]
    assert all("NCCL waits: 1 2" in out for out in outputs)


def test_a_job_whose_other_ranks_never_come_fails_within_the_timeout(tmp_path):
    """Rank 1 of 2 alone, rank 0 never started (a node that did not boot, a wrong MASTER_ADDR): a FAIL line within
    --timeout, not a hang in the process group's start."""
    shards = make_shards(tmp_path, n=2, frames=20)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preflight.py"), "--data", shards, "--recipe",
                             "tiny_PT", "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--output",
                             str(tmp_path / "run"), "--timeout", "2"], capture_output=True, text=True, timeout=60,
                            env=process_env(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=free_port()))
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "FAIL  distributed start" in result.stdout and "could not join the job" in result.stdout


# NCCL's INFO lines as NCCL 2.19-2.31 write them (the format strings of its INFO() calls)
NCCL_IB = """node-0:120:180 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB eth0:10.0.0.1<0>
node-0:120:180 [0] NCCL INFO Using network IB
node-0:120:180 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
node-0:120:180 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA
"""
NCCL_SOCKET = """node-0:120:180 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>
node-0:120:180 [0] NCCL INFO Using network Socket
node-0:120:180 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via SHM/direct/direct
node-0:120:180 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/Socket/0
"""


def test_the_network_check_tells_infiniband_from_a_tcp_fallback(monkeypatch):
    """Bus bandwidth alone passed NCCL on TCP sockets over 100-200 GbE (10-20 GB/s): the transport NCCL reports is
    judged by name, and the bandwidth within a node and across nodes against its own kind of link."""
    from tools.checks import environment
    from tools.checks.environment import _judge_network, nccl_transports

    assert nccl_transports(NCCL_IB) == {"network": "IB", "paths": ["NET/IB", "P2P"]}
    assert nccl_transports(NCCL_SOCKET) == {"network": "Socket", "paths": ["NET/Socket", "SHM"]}
    assert nccl_transports("NCCL INFO Using network IBext_v8")["network"] == "IB"  # through NCCL's plugin
    gpu = torch.device("cuda")
    base = {"backend": "nccl", "ranks": 16, "nodes": 2, "megabytes": 256}
    healthy = _judge_network({**base, "within_node_gb_per_s": 420.0, "across_nodes_gb_per_s": 45.0,
                              **nccl_transports(NCCL_IB)}, gpu, within=True, across=True)
    assert healthy.status == "PASS" and "NCCL network IB" in healthy.summary
    monkeypatch.setattr(environment.glob, "glob", lambda pattern: ["/sys/class/infiniband/mlx5_0"])
    sockets = _judge_network({**base, "within_node_gb_per_s": 380.0, "across_nodes_gb_per_s": 18.0,
                              **nccl_transports(NCCL_SOCKET)}, gpu, within=True, across=True)
    assert sockets.status == "FAIL" and "over TCP sockets although this node has InfiniBand" in sockets.summary
    assert "host memory" in sockets.summary and "NCCL_IB_HCA" in sockets.fix  # SHM inside the node too
    monkeypatch.setattr(environment.glob, "glob", lambda pattern: [])
    assert _judge_network({**base, "within_node_gb_per_s": 380.0, "across_nodes_gb_per_s": 18.0,
                           **nccl_transports(NCCL_SOCKET)}, gpu, within=False, across=True).status == "WARN"
    slow_ib = _judge_network({**base, "across_nodes_gb_per_s": 4.0, **nccl_transports(NCCL_IB)}, gpu, within=False,
                             across=True)
    assert slow_ib.status == "WARN" and "under 10 GB/s" in slow_ib.summary


TWO_NODES = """
import socket, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
if {apart} and rank == 1:
    socket.gethostname = lambda: "node-b"  # as if on a second node
from tools.checks.environment import check_network
from tools.checks.ranks import Ranks
check = check_network(torch.device("cpu"), Ranks(rank, 2, 60), None, megabytes=1)
print(rank, check.status, sorted(k for k in check.figures if k.endswith("gb_per_s")), check.figures["nodes"])
"""


@pytest.mark.parametrize("apart", [False, True])
def test_the_network_check_measures_within_a_node_and_across_nodes_apart(apart):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_NODES.format(root=ROOT, apart=apart)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=process_env(
                                  RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    first = outputs[0][0].strip()
    expected = "['across_nodes_gb_per_s'] 2" if apart else "['within_node_gb_per_s'] 1"
    assert first == f"0 PASS {expected}", outputs[0][1][-2000:]


def test_the_preflight_takes_a_fine_tuning_recipe(tmp_path, capsys):
    """Its help says it takes fine-tuning recipes: it stopped with KeyError: 'splits' (the label map was handed where
    the task reads the manifest)."""
    shards = make_shards(tmp_path, n=4, frames=20)
    _, stdout = preflight_here(capsys, "--data", shards, "--recipe", "demo_FT", "--ds_config",
                               os.path.join(ROOT, "ds_configs", "cpu.json"), "--output", str(tmp_path / "ft"),
                               "--steps", "2", "eval_split=train", "crop_size=32", "model.img_size=32", "num_frames=4",
                               "model.num_frames=4", "model.depth=2")
    report = {c["name"]: c for c in json.load(open(tmp_path / "ft" / "preflight.json"))["checks"]}
    assert "recipe" not in report and report["attention"]["status"] == "PASS", stdout[-3000:]
    assert report["timed run"]["status"] in ("PASS", "WARN") and report["timed run"]["figures"]["steps"] == 2
