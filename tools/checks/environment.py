"""The preflight's checks of the machines and the job: package versions, the output folder shared by every rank, and
the network between the ranks (all-reduce within a node and across nodes, and the transport NCCL chose)."""

import glob
import os
import re
import socket
import subprocess
import time

import torch
import torch.distributed as dist

from tools.checks.ranks import Ranks
from tools.checks.report import FAIL, PASS, SKIP, WARN, Check

# Bus bandwidth (GB/s, NCCL's definition) a healthy link gives an all-reduce: GPUs of one node over NVLink /
# NVSwitch reach hundreds (H100 SXM: ~450 at large sizes); one rank per node over InfiniBand or RoCE tens (one
# 200-400 Gb/s adapter: 25-50). Below these, something is off; TCP sockets over 100-200 GbE reach 10-20 across nodes
# and pass a bandwidth threshold, so the transport NCCL chose is checked by name.
WITHIN_NODE_GBPS = 100
ACROSS_NODES_GBPS = 10


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_versions() -> Check:
    from nvidia.dali import backend

    from trainer.versions import installed_version, version_problems

    versions = {p: installed_version(p) for p in ("torch", "nvidia-dali", "deepspeed")}
    versions["cuda_runtime"] = torch.version.cuda
    versions["driver"] = driver_version() if torch.cuda.is_available() else None
    problems = version_problems()
    schema = backend.TryGetSchema("decoders__Video")
    if schema is None or not (schema.HasArgument("frames") and schema.HasArgument("pad_mode")):
        problems.append("DALI's fn.decoders.video lacks per-sample `frames` / `pad_mode` (DALI >= 1.48 has them)")
    summary = (f"torch {versions['torch']}, DALI {versions['nvidia-dali']}, DeepSpeed {versions['deepspeed']}; "
               f"CUDA runtime {versions['cuda_runtime'] or 'none'}, driver {versions['driver'] or 'none'}")
    if problems:
        return Check("versions", FAIL, summary + ": " + "; ".join(problems),
                     "pip install -e . (or make) installs the floors; in an NGC container upgrade its DALI: "
                     "pip install -U nvidia-dali-cuda120", versions)
    return Check("versions", PASS, summary, figures=versions)


def check_shared_folder(run_dir: str, rank: int, world_size: int) -> Check:
    from trainer.run_folder import NotShared, check_shared

    try:
        check_shared(run_dir, rank, world_size)
    except NotShared as err:
        lines = str(err).splitlines()
        return Check("shared folder", FAIL, " ".join(lines[:-1])[:600], lines[-1])
    return Check("shared folder", PASS, f"all {world_size} rank(s) see each other's files in {run_dir}")


# --- the network -----------------------------------------------------------------------------------------------------


def nccl_errors_raise() -> None:
    """NCCL's failures and timeouts as exceptions in the rank that waits, not a process torn down by torch's
    watchdog (its default, TORCH_NCCL_ASYNC_ERROR_HANDLING=3): the rank reports a FAIL and every rank still meets the
    others in the gloo gather, so the report names the rank even when rank 0 is the one that failed. Blocking waits
    take precedence over the watchdog (pytorch/pytorch#47926), which then only aborts the communicator (2). Must
    run before the process group starts; the preflight only (the trainer's steps never wait on the host)."""
    os.environ.update(TORCH_NCCL_BLOCKING_WAIT="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="2")


def log_nccl_to(folder: str) -> str | None:
    """Have NCCL write its INFO log (transports, networks) into `folder`, one file per process, unless the user set
    NCCL_DEBUG; must run before NCCL starts. Returns the file name pattern, or None."""
    if "NCCL_DEBUG" in os.environ:
        return None
    os.makedirs(folder, exist_ok=True)
    os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET",
                      NCCL_DEBUG_FILE=os.path.join(folder, "nccl.%h.%p.log"))
    return os.environ["NCCL_DEBUG_FILE"]


def nccl_transports(log: str) -> dict:
    """What NCCL's INFO log says it uses: {"network": "IB" | "Socket" | None, "paths": the transports of its channels
    (P2P, SHM, NVLS, NET/IB, NET/Socket, ...)}. NCCL logs "Using network IB" (or "IBext_v8" through its plugin,
    "Socket" over TCP) and one "Channel 00/0 : 0[0] -> 1[1] [send] via NET/IB/0/GDRDMA" line per connection."""
    network = re.findall(r"Using network (\w+)", log)
    kind = None if not network else "IB" if network[-1].startswith("IB") else network[-1]
    paths = {m[0] + (f"/{m[1]}" if m[0] == "NET" and m[1] else "") for m in re.findall(r" via (\w+)(?:/(\w+))?", log)}
    return {"network": kind, "paths": sorted(paths)}


def _own_nccl_log(pattern: str | None) -> str:
    if not pattern:
        return ""
    path = pattern.replace("%h", socket.gethostname()).replace("%p", str(os.getpid()))
    text = ""
    for name in glob.glob(path) or glob.glob(path.replace(socket.gethostname(), "*")):
        with open(name, errors="replace") as f:
            text += f.read()
    return text


def _bus_bandwidth(tensor: torch.Tensor, group, size: int, rounds: int = 5) -> float:
    """All-reduce bus bandwidth in GB/s among the `size` ranks of `group`: 2 (n-1)/n x bytes / time (NCCL's own
    definition)."""
    for _ in range(2):
        dist.all_reduce(tensor, group=group)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(tensor, group=group)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    seconds = (time.perf_counter() - start) / rounds
    return 2 * (size - 1) / size * tensor.numel() * tensor.element_size() / seconds / 1e9


def check_network(device: torch.device, ranks: Ranks, nccl_log: str | None, megabytes: int | None = None) -> Check:
    """All-reduce bus bandwidth among the ranks of each node, and among one rank per node, each against what its kind
    of link gives, and the transports NCCL chose. Every rank takes every collective, whatever fails on its side, and
    each waits at most the preflight's timeout."""
    if ranks.world_size == 1:
        return Check("all-reduce", SKIP, "one process: nothing to reduce")
    hosts = ranks.gather(socket.gethostname())
    if hosts is None:
        return Check("all-reduce", FAIL, "some rank did not answer", "see that rank's output")
    nodes = [[r for r, h in enumerate(hosts) if h == host] for host in dict.fromkeys(hosts)]
    node = next(members for members in nodes if ranks.rank in members)
    node_groups = [dist.new_group(members, timeout=ranks.timeout) for members in nodes]  # every rank: every group
    leaders = [members[0] for members in nodes]
    across_group = dist.new_group(leaders, timeout=ranks.timeout) if len(nodes) > 1 else None
    megabytes = megabytes or (256 if device.type == "cuda" else 16)
    try:
        tensor = torch.ones(megabytes * 2**20 // 4, device=device)
    except RuntimeError as err:  # (torch.OutOfMemoryError among them)
        tensor, problem = None, f"{type(err).__name__}: {err}"
    else:
        problem = None
    if ranks.failing(tensor is not None):  # one rank without its buffer would leave the others waiting
        return Check("all-reduce", FAIL, f"could not allocate {megabytes} MB: {problem}" if problem else
                     "another rank could not allocate its buffer", "free memory on the GPU")
    figures = {"nodes": len(nodes), "ranks": ranks.world_size, "megabytes": megabytes, "backend": dist.get_backend()}
    if len(node) > 1:
        figures["within_node_gb_per_s"] = round(_bus_bandwidth(tensor, node_groups[nodes.index(node)], len(node)), 1)
    if across_group is not None and ranks.rank in leaders:
        figures["across_nodes_gb_per_s"] = round(_bus_bandwidth(tensor, across_group, len(nodes)), 1)
    figures.update(nccl_transports(_own_nccl_log(nccl_log)) if device.type == "cuda" else {"network": "gloo (TCP)"})
    return _judge_network(figures, device, len(node) > 1, across_group is not None and ranks.rank in leaders)


def _judge_network(figures: dict, device: torch.device, within: bool, across: bool) -> Check:
    parts = [f"{figures['backend']}, {figures['ranks']} ranks on {figures['nodes']} node(s), {figures['megabytes']} MB"]
    if within:
        parts.append(f"within a node {figures['within_node_gb_per_s']} GB/s")
    if across:
        parts.append(f"across nodes (one rank each) {figures['across_nodes_gb_per_s']} GB/s")
    if figures.get("paths"):
        parts.append(f"NCCL network {figures['network']}, paths {', '.join(figures['paths'])}")
    summary = "; ".join(parts) + " (bus bandwidth)"
    if device.type != "cuda":
        return Check("all-reduce", PASS, summary, figures=figures)
    problems, fixes, status = [], [], PASS
    if within and (figures["within_node_gb_per_s"] < WITHIN_NODE_GBPS or "SHM" in figures.get("paths", [])):
        problems.append(f"GPUs of one node reach under {WITHIN_NODE_GBPS} GB/s or talk through host memory: no "
                        "NVLink between them, or peer-to-peer is off")
        fixes.append("nvidia-smi topo -m; unset NCCL_P2P_DISABLE; in VMs and containers check IOMMU/ACS settings")
        status = WARN
    if across and figures.get("network") == "Socket":
        adapters = glob.glob("/sys/class/infiniband/*")
        problems.append("NCCL sends between nodes over TCP sockets" + (
            f" although this node has InfiniBand/RoCE adapters ({', '.join(map(os.path.basename, adapters[:4]))})"
            if adapters else " (no InfiniBand/RoCE adapter here): a large job's step will wait on the network"))
        fixes.append("NCCL_IB_DISABLE unset, NCCL_IB_HCA naming the adapters, the container started with "
                     "/dev/infiniband; NCCL_DEBUG=INFO says why IB was not used")
        status = FAIL if adapters else WARN
    elif across and figures["across_nodes_gb_per_s"] < ACROSS_NODES_GBPS:
        problems.append(f"one rank per node reaches under {ACROSS_NODES_GBPS} GB/s")
        fixes.append("check the adapters' link speed (ibstat) and NCCL_IB_HCA; GPUDirect RDMA (NET/IB/.../GDRDMA)")
        status = WARN
    if problems:
        return Check("all-reduce", status, summary + "; " + "; ".join(problems), "; ".join(fixes), figures)
    return Check("all-reduce", PASS, summary, figures=figures)
