"""Prove a node, or a whole job, before a week-long run: in about two minutes, one line per check, PASS / WARN / FAIL
with the fix for each problem, and RUN_DIR/preflight.json. Exits 1 if anything FAILs.

    python tools/preflight.py --data shards/k400 --recipe k400_VIT_L_16x4_MAE_PT \\
        --ds_config ds_configs/zero2_bf16.json --output runs/vit_l
    deepspeed --num_gpus 8 tools/preflight.py ...          # every rank checks itself; rank 0 reports
    deepspeed --hostfile hostfile tools/preflight.py ...   # the whole job: shared folder, NCCL between nodes

Checks: versions (and DALI's video decoder features), the output folder shared by every rank, all-reduce bus
bandwidth, NVDEC decoding a real H.264 clip (GPU) or the host decoder the loader will use (CPU), the shards against
the hardware (formats NVDEC cannot decode, frame sizes), the attention kernel that runs for the recipe's shapes,
memory (one real micro-batch on a GPU; the estimate on a CPU), and a short timed run of the real trainer. On a CPU
machine the GPU-only checks say "skipped (no GPU)". Recipe overrides work as in the trainers (key=value).
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script (python tools/preflight.py, or by the deepspeed launcher)
    sys.path.insert(0, ROOT)

from tools.checks.preflight import FAIL, PASS, SKIP, WARN, Check, guarded  # noqa: E402

ORDER = {FAIL: 3, WARN: 2, PASS: 1, SKIP: 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py")
    p.add_argument("--recipe", required=True, help="a pretraining or fine-tuning recipe (trainer/recipes.py)")
    p.add_argument("--ds_config", required=True, help="the DeepSpeed config the run will use")
    p.add_argument("--output", required=True, help="the run folder the run will use (preflight.json goes there)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the timed run (default 30)")
    p.add_argument("--pretrained", help="fine-tuning recipes: the weights the run will start from")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model.key=value")
    args = p.parse_intermixed_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    return args


def task_for(recipe_name: str):
    from trainer.finetune import Finetuning
    from trainer.pretrain import Pretraining

    for task in (Pretraining, Finetuning):
        if recipe_name in task.recipes:
            return task
    known = sorted(Pretraining.recipes) + sorted(Finetuning.recipes)
    raise ValueError(f"unknown recipe {recipe_name!r}; choose one of {known}")


def merge(per_rank: list[list[dict]]) -> list[Check]:
    """One Check per name over all ranks: the worst status; rank 0's text unless another rank is worse."""
    merged = []
    for i, first in enumerate(per_rank[0]):
        checks = [Check(**ranks[i]) for ranks in per_rank]
        worst = max(range(len(checks)), key=lambda r: (ORDER[checks[r].status], -r))
        chosen = checks[worst]
        if len(checks) > 1 and worst != 0:
            ranks = [r for r, c in enumerate(checks) if c.status == chosen.status]
            chosen.summary = f"ranks {ranks[:16]}{' ...' if len(ranks) > 16 else ''}: {chosen.summary}"
        merged.append(chosen)
    return merged


def report(checks: list[Check], header: str, path: str) -> int:
    print(header)
    for check in checks:
        print(f"{check.status:4s}  {check.name:13s} {check.summary}")
        if check.fix and check.status in (FAIL, WARN):
            print(f"      {'fix:':13s} {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN, PASS, SKIP)}
    with open(path, "w") as f:
        json.dump({"header": header, "counts": counts, "checks": [asdict(c) for c in checks]}, f, indent=1)
    print(f"result: {counts[FAIL]} FAIL, {counts[WARN]} WARN, {counts[PASS]} PASS, {counts[SKIP]} skipped; "
          f"written to {path}")
    return 1 if counts[FAIL] else 0


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from dali_pipes.decoders import choose_decoder, gpu_available
    from dali_pipes.shard_format import read_manifest
    from tools.checks import preflight as checks
    from trainer.engine import init_distributed, load_ds_config
    from trainer.recipes import check_recipe, resolve_recipe

    args = parse_args(argv)
    results = [guarded("versions", checks.check_versions)]
    try:  # what the trainer refuses before starting anything: nothing else can be checked without it
        task_type = task_for(args.recipe)
        recipe = resolve_recipe(task_type.recipes, args.recipe, args.overrides)
        check_recipe(recipe)
        task = task_type.from_args(argparse.Namespace(pretrained=args.pretrained, eval_only=False))
        manifest = read_manifest(args.data)
        model_cfg = task.model_config(recipe, manifest["label_map"])
    except (ValueError, TypeError, FileNotFoundError) as err:
        results.append(Check("recipe", FAIL, str(err), "fix the recipe, its overrides or --data"))
        return report(results, "preflight stopped before starting any process", os.path.join(
            args.output, "preflight.json") if os.path.isdir(args.output) else "preflight.json")
    os.makedirs(args.output, exist_ok=True)
    env = init_distributed()
    views = task.views_per_clip(recipe)
    results.append(guarded("shared folder", checks.check_shared_folder, args.output, env.rank, env.world_size))
    results.append(guarded("all-reduce", checks.check_all_reduce, env.device, env.world_size))
    results.append(guarded("NVDEC", checks.check_nvdec, env.device))
    codecs = manifest["splits"].get(recipe.split, {}).get("codecs", {})
    try:
        decoder = choose_decoder(recipe.decoder, codecs, env.device.type == "cuda" and gpu_available())[0].name
    except ValueError as err:
        decoder = None
        results.append(Check("host decoder", FAIL, str(err), "choose another decoder= or rebuild the shards"))
    if decoder:
        results.append(guarded("host decoder", checks.check_host_decoder, decoder))
    ds_config = None
    try:
        ds_config = load_ds_config(args.ds_config, recipe, env.world_size, env.device)
    except ValueError as err:
        results.append(Check("ds_config", FAIL, str(err).replace("\n", " "), "edit the ds_config as it says"))
    if ds_config:
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        results.append(guarded("attention", checks.check_attention, model_cfg, env.device, dtype))
        results.append(guarded("memory", checks.check_memory, model_cfg, recipe, ds_config, env.device,
                               env.world_size, views))
    # the timed run needs every rank healthy: a rank that failed above would hang the others' collectives
    healthy = all(c.status != FAIL for c in results)
    statuses = [healthy] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(statuses, healthy)
    if all(statuses) and ds_config:
        run_args = argparse.Namespace(ds_config=args.ds_config, recipe=args.recipe, data=args.data,
                                      output=args.output, max_steps=None)
        timed = guarded("timed run", checks.check_timed_run, task, run_args, recipe, model_cfg, env, args.steps,
                        ds_config)
    else:
        timed = Check("timed run", SKIP, "not run: a check above failed (on this or another rank)")
    results.append(timed)
    shards = guarded("shards", checks.check_shards, args.data, recipe.split, decoder, env.device,
                     timed.figures.get("views_per_s_per_gpu"), views)
    results.insert(4, shards)
    gathered = [[asdict(c) for c in results]] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(gathered, [asdict(c) for c in results])
    merged = merge(gathered)
    if not env.is_main:
        return 1 if any(c.status == FAIL for c in merged) else 0
    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU (no GPU)"
    header = f"preflight of {args.recipe} on {args.data}: {env.world_size} process(es); {gpu}"
    return report(merged, header, os.path.join(args.output, "preflight.json"))


if __name__ == "__main__":
    sys.exit(main())
