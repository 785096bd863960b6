"""Prove a node, or a whole job, before a week-long run: in about two minutes, one line per check, PASS / WARN / FAIL
with the fix for each problem, and RUN_DIR/preflight.json. Exits 1 if anything FAILs.

    python tools/preflight.py --data shards/k400 --recipe k400_VIT_L_16x4_MAE_PT \\
        --ds_config ds_configs/zero2_bf16.json --output runs/vit_l
    deepspeed --num_gpus 8 tools/preflight.py ...          # every rank checks itself; rank 0 reports
    deepspeed --hostfile hostfile tools/preflight.py ...   # the whole job: shared folder, NCCL between nodes
    srun python tools/preflight.py ...                     # (or torchrun, mpirun: as the trainer)

Checks: versions (and DALI's video decoder features), the output folder shared by every rank, all-reduce bus
bandwidth within a node and across nodes with the transport NCCL chose, a shard set in object storage (--data
s3://...: reachable, credentials, every training shard and index at its size, one stream's read rate in MB/s), a
probe clip of every codec in the shards decoded by the decoder it gets here (NVDEC on the GPU this runs on, or a
host decoder), the shards against the hardware (formats this GPU's NVDEC cannot decode, frame sizes), the attention
kernel that runs for the recipe's shapes, memory (one real micro-batch on a GPU; the estimate on a CPU), and a short
timed run of the real trainer.
On a CPU machine the GPU-only checks say "skipped (no GPU)". Recipe overrides work as in the trainers (key=value).
Every rank takes part in every collective whatever fails on its side, with --timeout on each, so a rank that fails
or hangs becomes a FAIL naming it instead of a job that hangs.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script (python tools/preflight.py, or by the deepspeed launcher)
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
from tools.checks.report import FAIL, SKIP, Check, guarded, merge, write_report  # noqa: E402

RANK_REPORTS = ".preflight"  # each rank's checks, in --output: read when some rank does not answer the gather


def named(check: Check, source, sources) -> Check:
    """A check of one set of a mixture, named after it ("shards k400"); one set's keeps its plain name."""
    return check if len(sources) == 1 else dataclasses.replace(check, name=f"{check.name} {source.name}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py (a folder, or s3://, gs://, "
                                                 "http(s)://: the shard store check)")
    p.add_argument("--recipe", required=True, help="a pretraining or fine-tuning recipe (trainer/recipes.py)")
    p.add_argument("--ds_config", required=True, help="the DeepSpeed config the run will use")
    p.add_argument("--output", required=True, help="the run folder the run will use (preflight.json goes there)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the timed run (default 30)")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds a rank waits for the others in a collective before that check FAILs, naming the "
                        "ranks that did not answer (default 300)")
    p.add_argument("--pretrained", help="fine-tuning recipes: the weights the run will start from")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model.key=value")
    args = p.parse_intermixed_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def task_for(recipe_name: str):
    from trainer.finetune import Finetuning
    from trainer.pretrain import Pretraining

    for task in (Pretraining, Finetuning):
        if recipe_name in task.recipes:
            return task
    known = sorted(Pretraining.recipes) + sorted(Finetuning.recipes)
    raise ValueError(f"unknown recipe {recipe_name!r}; choose one of {known}")


def gather_reports(ranks, rank: int, own: list, folder: str, wait: float = 10.0) -> list:
    """Every rank's checks (as dicts); a rank that does not answer the gather in time is read from the file it
    wrote into the shared run folder, or is None."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank:05d}.json"), "w") as f:
        json.dump(own, f)
    gathered = ranks.gather(own)
    if gathered is not None:
        return gathered
    deadline, found = time.time() + wait, {}
    while time.time() < deadline and len(found) < ranks.world_size:
        for r in range(ranks.world_size):
            path = os.path.join(folder, f"rank{r:05d}.json")
            if r not in found and os.path.exists(path):
                with open(path) as f:
                    found[r] = json.load(f)
        time.sleep(0.5)
    return [found.get(r) for r in range(ranks.world_size)]


class Stopped(Exception):
    """The preflight cannot go on: the check that says why, and the report's header."""

    def __init__(self, check: Check, header: str, report_to: str | None = None):
        super().__init__(header)
        self.check, self.header, self.report_to = check, header, report_to


def configure(args):
    """(task, model config, the sets of --data) as the trainer resolves them: what it refuses before starting
    anything refuses the preflight too (a store's refusal is the shard store's FAIL)."""
    from dali_pipes.mixture import parse_data
    from dali_pipes.shard_store import StoreRefused
    from tools.checks import store
    from trainer.cli import resolve

    header = "preflight stopped before starting any process"
    try:
        task, model_cfg = resolve(task_for(args.recipe), argparse.Namespace(**vars(args), eval_only=False))
        return task, model_cfg, parse_data(args.data, task.recipe.loading.mixture)
    except StoreRefused as err:  # (the manifest is read with the recipe: a credential, a bucket, a missing set)
        raise Stopped(Check("shard store", FAIL, str(err), store.FIX), header) from None
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise Stopped(Check("recipe", FAIL, str(err), "fix the recipe, its overrides or --data"), header,
                      os.path.join(args.output, "preflight.json") if os.path.isdir(args.output) else None) from None


def start_processes(args):
    """This process in the job (trainer/engine.py), NCCL's failures raised where they happen and logged."""
    from tools.checks import environment
    from trainer.engine import init_distributed

    os.makedirs(args.output, exist_ok=True)
    nccl_log = environment.log_nccl_to(os.path.join(args.output, "nccl"))
    environment.nccl_errors_raise()
    try:
        return init_distributed(timeout=args.timeout), nccl_log
    except Exception as err:  # an incomplete launch, or a network that does not answer within the timeout
        first = (str(err).strip().splitlines() or [""])[0][:600]
        raise Stopped(Check("distributed start", FAIL, f"{type(err).__name__}: {first}",
                            "every process of the job must start and reach MASTER_ADDR:MASTER_PORT (see the "
                            "README's launcher table); NCCL_DEBUG=INFO shows the network NCCL tries"),
                      "preflight stopped: this process could not join the job") from None


def check_decoding(recipe, sources, env) -> tuple[list, object]:
    """(the decoder checks, the route the loader takes for every set of --data, or None if there is none)."""
    from dali_pipes.decoders import choose_route, gpu_capability
    from dali_pipes.shard_format import read_manifest
    from dali_pipes.shard_set import open_shard_set, summed_formats
    from tools.checks import decoding

    try:
        formats = summed_formats(open_shard_set(s.location, recipe.loading.split, recipe.loading.skip_damaged_shards)
                                 for s in sources)
        route = choose_route(recipe.loading.decoder, formats, gpu_capability(env.device))
        split = read_manifest(sources[0].location)["splits"].get(recipe.loading.split, {})
        return decoding.check_decoders(route, formats, env.device, decoding.shards_frame(split)), route
    except (ValueError, FileNotFoundError) as err:
        return [Check("decoders", FAIL, str(err), "choose another decoder=, or rebuild the shards")], None


def check_model(args, task, model_cfg, env) -> tuple[list, object]:
    """(the ds_config, attention and memory checks, the run's batch plan or None)."""
    from tools.checks import model
    from trainer.data import pixels_median
    from trainer.ds_config import plan_batch, read_ds_config

    recipe = task.recipe
    try:
        ds_config = read_ds_config(args.ds_config, recipe)
        batch = plan_batch(recipe.optim.batch_size, ds_config.micro_batch, env.world_size, ds_config.accumulation)
    except ValueError as err:
        return [Check("ds_config", FAIL, str(err).replace("\n", " "), "edit the ds_config or the recipe as it "
                      "says")], None
    pixels = pixels_median(args.data, recipe.loading)
    masking = getattr(recipe, "masking", None)  # (pretraining's: the encoder sees the visible tokens)
    return [guarded("attention", model.check_attention, model_cfg, env.device, ds_config.dtype,
                    masking.mask_ratio if masking else 0.9),
            guarded("memory", model.check_memory, model_cfg, recipe, ds_config, batch, env.device,
                    task.views_per_clip(), pixels)], (ds_config, batch)


def main(argv=None) -> int:
    import shutil

    import torch

    from tools.checks import decoding, environment, store, timed_run
    from tools.checks.ranks import Ranks
    from trainer.setup import RunArgs

    args = parse_args(argv)
    results = [guarded("versions", environment.check_versions)]
    try:
        task, model_cfg, sources = configure(args)
        env, nccl_log = start_processes(args)
    except Stopped as stopped:
        return write_report(results + [stopped.check], stopped.header, stopped.report_to)
    recipe, ranks = task.recipe, Ranks(env.rank, env.world_size, args.timeout)
    results.append(guarded("shared folder", environment.check_shared_folder, args.output, env.rank, env.world_size))
    results.append(guarded("all-reduce", environment.check_network, env.device, ranks, nccl_log))
    results += [named(guarded("shard store", store.check_store, s.location, recipe.loading.split), s, sources)
                for s in sources]
    decoders, route = check_decoding(recipe, sources, env)
    modelled, planned = check_model(args, task, model_cfg, env)
    results += decoders + modelled
    # the timed run's collectives need every rank healthy: a rank that failed above would leave the others waiting
    failing = ranks.failing(all(c.status != FAIL for c in results) and planned is not None)
    if failing == [] and planned:
        run_args = RunArgs(args.output, args.ds_config, args.data, args.recipe)
        timed = guarded("timed run", timed_run.check_timed_run, task, run_args, model_cfg, env, args.steps,
                        planned[1], planned[0].dtype)
    else:
        where = "some rank did not answer" if failing is None else f"a check failed on ranks {failing[:16]}"
        timed = Check("timed run", SKIP, f"not run: {where}")
    results.append(timed)
    if route is not None:
        after_stores = 3 + len(sources)  # versions, shared folder, all-reduce, then each set's store
        results[after_stores:after_stores] = [
            named(guarded("shards", decoding.check_shards, s.location, recipe.loading.split, route, env.device,
                          timed.figures.get("views_per_s_per_gpu"), task.views_per_clip()), s, sources)
            for s in sources]
    folder = os.path.join(args.output, RANK_REPORTS)
    merged = merge(gather_reports(ranks, env.rank, [asdict(c) for c in results], folder))
    if not env.is_main:
        return 1 if any(c.status == FAIL for c in merged) else 0
    shutil.rmtree(folder, ignore_errors=True)
    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU (no GPU)"
    header = (f"preflight of {args.recipe} on {args.data}: {env.world_size} process(es) started by {env.launcher}; "
              f"{gpu}")
    return write_report(merged, header, os.path.join(args.output, "preflight.json"))


if __name__ == "__main__":
    sys.exit(main())
