"""The trainers' command line: the arguments, everything that can be checked before a process group, DeepSpeed or
DALI starts (the recipe and its overrides, the model's options, a resume's changes, the installed versions), and
the exit codes: 0 done, 2 refused before starting (a shard store that cannot serve the set too: credentials, bucket,
manifest, index), 3 stopped by the loss guard, 4 the shard store stopped answering during the run (after the
reader's retries; the checkpoints are kept: start again to resume), 75 stopped by a signal (checkpointed; start
again to resume)."""

import argparse
import sys

from trainer import supervise
from trainer.checkpointing import Checkpointer
from trainer.data import data_change, data_facts, task_manifest
from trainer.recipes import CHANGEABLE_ON_RESUME, as_saved, recipe_changes, recipe_kind, resolve_recipe
from trainer.run import Run
from trainer.setup import RunArgs, set_up
from trainer.run_folder import NotShared
from trainer.versions import VersionProblem, require_versions


def parse_args(task_type, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=task_type.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed config (ds_configs/*.json)")
    p.add_argument("--recipe", required=True, help=f"one of {sorted(task_type.recipes)}")
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py (a folder, s3://bucket/prefix, "
                   "gs://..., http(s)://...: README, Data in object storage)" + (
                       ", or a weighted mixture of them: NAME=LOCATION:WEIGHT[:option=value...],... (README: Mixtures)"
                       if task_type.mixes_sets else " (one set: its labels are the model's classes)"))
    p.add_argument("--output", required=True, help="run folder: checkpoints, logs; an existing one is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (checkpointing at the end)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume with a recipe that differs from the run's in what it computes (logged)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher (read from the env)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model options model.key=value")
    task_type.add_arguments(p)
    return p.parse_intermixed_args(argv)


def resolve(task_type, args: argparse.Namespace):
    """(task, model config) for the command line's recipe, overrides, data and task options, with every problem of
    the recipe, its overrides and the model's options in one ValueError; nothing heavy is started."""
    problems = []
    task = task_type.from_args(args, resolve_recipe(task_type.recipes, args.recipe, args.overrides, problems))
    try:  # the model's options and the --data spec too, in the same message
        model_cfg = task.model_config(task_manifest(args.data, task.recipe.loading, task))
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid options: " + "; ".join(problems))
    return task, model_cfg


def check_resume_changes(run_dir: str, recipe, data: list, allowed: bool) -> dict:
    """What differs between `recipe` and `data` (trainer/data.py data_facts) and what the run in `run_dir` was
    checkpointed with ({} for a new run; the data as "data"); a change that would not continue the same run is
    refused unless `allowed`, and a run of the other task always."""
    saved = Checkpointer.saved_meta(run_dir)
    if not saved or "recipe" not in saved:
        return {}
    ran, now = recipe_kind(saved["recipe"]), recipe_kind(as_saved(recipe))
    if ran != now:
        use = f"fine-tune from it into a new --output with --pretrained {run_dir}" if ran == "pretraining" else \
            "pretrain into a new --output"
        raise ValueError(f"{run_dir} holds a {ran} run (checkpointed at step {saved['step']}), not a {now} one: "
                         f"{use}")
    changes = recipe_changes(saved["recipe"], recipe)
    breaking = {name: change for name, change in changes.items() if name not in CHANGEABLE_ON_RESUME}
    listed = ", ".join(f"{name} {before!r} -> {after!r}" for name, (before, after) in sorted(breaking.items()))
    moved = data_change(saved.get("data"), data)
    if moved:
        changes["data"] = moved
        listed += ("; " if listed else "") + f"the data {moved}"
    if listed and not allowed:
        raise ValueError(f"{run_dir} was checkpointed at step {saved['step']} with another " + (
            "recipe" if breaking else "data") + f" ({listed}): resuming with these changes would not "
            "continue the same run. Drop them, start a new --output, or pass --allow-changes to go on with them (the "
            "run then differs from one started with them; the change is logged and its configuration kept in "
            "RUN_DIR/configs/" + ("; the new data is read from its beginning" if moved else "") + ")")
    return changes


def prepare(task_type, argv=None):
    """(task, args, model config) from the command line, everything checked that can be without starting anything
    heavy; raises ValueError (and its kin) with the reason."""
    args = parse_args(task_type, argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    task, model_cfg = resolve(task_type, args)
    check_resume_changes(args.output, task.recipe, data_facts(args.data, task.recipe.loading), args.allow_changes)
    require_versions()
    return task, args, model_cfg


def main(task_type, argv=None) -> int:
    try:
        task, args, model_cfg = prepare(task_type, argv)
        run = Run(set_up(task, RunArgs.from_command_line(args), model_cfg))
    except (ValueError, TypeError, FileNotFoundError, VersionProblem, NotShared) as err:  # ConfigConflict too
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = run.train()
    supervise.record_exit(code)  # (under trainer/supervise.py: the job ends with it)
    return code
