"""What differs between pretraining and fine-tuning (a Task), and the things done between optimizer steps that
decide their own timing (Hooks). Both receive what they need, not the run: a task its recipe, the model and the
batch; a hook what it was built with, and the step or epoch that just ended."""

import argparse
import copy
import dataclasses

from dali_pipes import TrainViews


class Hook:
    """Something done between optimizer steps (pictures, validations, probes): it says when it wants a step's batch
    and outputs, and acts after the steps and epochs it chooses."""

    def begin(self, step: int) -> None:
        """Before the run's first step (a resumed run's too): the run stands at `step`."""

    def end(self, step: int) -> None:
        """After the run's last step (the schedule's end or --max-steps; not when stopped), on every rank."""

    def wants_outputs(self, step: int) -> bool:
        """Whether after_step needs this step's batch and outputs (kept one step longer than usual)."""
        return False

    def after_step(self, step: int, batch: dict | None, outputs) -> None:
        pass

    def after_epoch(self, epoch: int, step: int) -> None:
        pass

    def summary(self) -> list[str]:
        """Lines for the run's closing summary."""
        return []


class Task:
    """A task is made from its recipe and its own command-line options (from_args)."""

    recipes: dict = {}
    description: str = ""
    trains: bool = True  # False: evaluation only
    mixes_sets: bool = False  # --data may be a mixture of shard sets (labels are per set: only if it reads none)
    export_name: str = ""  # the fp32 weights written at the end: RUN_DIR/export/<export_name>, in mae_st's format

    def __init__(self, recipe):
        self.recipe = recipe

    def measuring(self) -> "Task":
        """This task for a tool's timed steps: checkpoints, pictures, logs, validations and probes off."""
        off = {"run": {"checkpoint_every": 0, "image_every": 0, "log_every": 0}, "evaluation": {"eval_every": 0},
               "probe": {"probe_every": 0}}
        measured = copy.copy(self)
        measured.recipe = dataclasses.replace(self.recipe, **{
            section: dataclasses.replace(getattr(self.recipe, section), **fields)
            for section, fields in off.items() if hasattr(self.recipe, section)})
        return measured

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    @classmethod
    def from_args(cls, args: argparse.Namespace, recipe) -> "Task":
        return cls(recipe)

    def model_config(self, manifest: dict):
        """The model's configuration (validated, no weights yet), for data described by its manifest."""
        raise NotImplementedError

    def build_model(self, cfg):
        raise NotImplementedError

    def views_per_clip(self) -> int:
        """Rows of the model's batch per decoded clip."""
        return TrainViews(self.recipe.views).views_per_clip

    def loss(self, model, batch: dict):
        """(scalar loss, whatever a hook may want to see of this step)."""
        raise NotImplementedError

    def flops_per_clip(self, cfg) -> float:
        """Training FLOPs (forward and backward) for one decoded clip, all its views."""
        raise NotImplementedError

    def lr_scale_of(self, model):
        """A per-parameter lr multiplier (name -> scale), or None."""
        return None

    def hooks(self, model, loader_config, monitor, last_step: int) -> list[Hook]:
        """This task's hooks for a run of `model` (the engine) fed by `loader_config`, logging to `monitor`."""
        return []

    def finish(self, step: int) -> list[str]:
        """Work after the last step (on every rank): the run stands at `step`; lines for the closing summary."""
        return []
