"""Checkpoints of a run: DeepSpeed's (weights, optimizer, schedule) plus each rank's loader position and RNG states,
an atomic `latest` pointer that moves only once a checkpoint is whole, and an fp32 export in mae_st's format. The
one place that knows the run folder's checkpoints and DeepSpeed's ZeRO files (read_weights turns them into plain
weights for loading elsewhere).

    RUN_DIR/checkpoints/latest                  the tag of the newest whole checkpoint
    RUN_DIR/checkpoints/step00001000/           DeepSpeed's files, meta.json, rank00000.pt, rank00001.pt, ...
Starting again in the same RUN_DIR resumes from `latest`. On another number of processes, DeepSpeed's universal
checkpoint format is made from it first (deepspeed.checkpoint.ds_to_universal) and loaded instead.
"""

import glob
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from models import MaskedAutoencoder
from models.checkpoints import from_ours, to_container
from models.hub import encoder_of, save_pretrained
from trainer.atomic_files import atomic_file, atomic_write_text
from trainer.cadence import due

log = logging.getLogger("trainer")


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class ResumePlan:
    tag: str
    universal: bool  # written by another number of processes: load DeepSpeed's universal conversion

    def adjust(self, ds_config: dict) -> dict:
        """The ds_config that loads this checkpoint."""
        if not self.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


class Checkpointer:
    def __init__(self, run_dir: str, env, keep: int, every: int = 0):
        """keep: how many of the newest checkpoints stay; every: optimizer steps between them (0: at the end only)."""
        self.dir = os.path.join(run_dir, "checkpoints")
        self.env, self.keep, self.every = env, keep, every
        self.run_facts = {}  # what every checkpoint's meta.json records of the run (its global batch, schedule)
        os.makedirs(self.dir, exist_ok=True)

    def due(self, step: int, last_step: int) -> bool:
        """Whether a checkpoint falls on this step (the last one is written by whoever ends the run)."""
        return due(step, self.every) and step < last_step

    def latest(self) -> str | None:
        return latest_tag(self.dir)

    def saved_run(self) -> dict | None:
        """The meta.json of the checkpoint a start resumes from (its step, world size, ZeRO stage and the run's
        facts: global batch, schedule, recipe), or None for a fresh run."""
        return self.saved_meta(os.path.dirname(self.dir))

    @staticmethod
    def saved_meta(run_dir: str) -> dict | None:
        """saved_run() of the run folder `run_dir`, before any process group is started."""
        checkpoints = os.path.join(run_dir, "checkpoints")
        tag = latest_tag(checkpoints)
        if tag is None:
            return None
        with open(os.path.join(checkpoints, tag, "meta.json")) as f:
            return json.load(f)

    def resume_plan(self) -> "ResumePlan | None":
        """What to resume from (None: a fresh run). A checkpoint written by another number of processes is converted
        to DeepSpeed's universal format first: rank 0 converts while the others wait for the folder to appear, not in
        a collective (converting ViT-L/H on a network filesystem can outlast a collective's timeout)."""
        tag = self.latest()
        if tag is None:
            return None
        with open(os.path.join(self.dir, tag, "meta.json")) as f:
            meta = json.load(f)
        if meta["world_size"] == self.env.world_size:
            return ResumePlan(tag, universal=False)
        universal = f"{tag}_universal"
        target = os.path.join(self.dir, universal)
        log.warning("%s was written by %d processes, this run has %d: loading it through DeepSpeed's universal "
                    "checkpoint format (%s)", tag, meta["world_size"], self.env.world_size, universal)
        if self.env.is_main:  # what a killed or failed conversion left
            for stale in (f"{target}.partial", f"{target}.failed"):
                if os.path.isdir(stale):
                    shutil.rmtree(stale)
                elif os.path.exists(stale):
                    os.remove(stale)
        if self.env.world_size > 1:
            dist.barrier()  # (before the conversion: nobody sees a stale marker)
        if self.env.is_main and not os.path.isdir(target):
            try:
                convert_to_universal(os.path.join(self.dir, tag), target)
            except RuntimeError as err:
                atomic_write_text(f"{target}.failed", str(err))
                raise
        else:
            _wait_for(target, f"{target}.failed", f"rank 0 converting {tag} to {universal}")
        return ResumePlan(universal, universal=True)

    def resume(self, engine, plan: "ResumePlan", stateful: dict) -> int:
        """Load the plan's checkpoint into the engine, the RNGs and each of `stateful` ({name: an object with
        state_dict / load_state_dict}: the loader, the loss guard); returns the optimizer step to continue from."""
        tag = plan.tag
        path, _ = engine.load_checkpoint(self.dir, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {self.dir}")
        if plan.universal:
            place_optimizer_state(getattr(engine.optimizer, "optimizer", engine.optimizer))
        source = tag.removesuffix("_universal")
        with open(os.path.join(self.dir, source, "meta.json")) as f:
            step = json.load(f)["step"]
        own = os.path.join(self.dir, source, f"rank{self.env.rank:05d}.pt")
        same_layout = tag == source and os.path.exists(own)
        # our own files: numpy's RNG state is not a tensor. On another layout of processes rank 0's state serves
        # every rank (the loader goes on with its epoch in a fresh order), and each rank reseeds
        state = torch.load(own if same_layout else os.path.join(self.dir, source, "rank00000.pt"), weights_only=False)
        for name, component in stateful.items():
            if name in state:
                component.load_state_dict(state[name])
        if same_layout:
            set_rng_state(state["rng"], self.env.device)
        return step

    def save(self, engine, step: int, stateful: dict) -> str:
        """Write checkpoint step{step} (the engine's files, and this rank's RNGs and `stateful` components' states);
        `latest` moves to it only once every rank has written its part."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(self.dir, tag=tag, client_state={"step": step}, save_latest=False)
        folder = os.path.join(self.dir, tag)
        own = os.path.join(folder, f"rank{self.env.rank:05d}.pt")
        with atomic_file(own) as f:
            torch.save({**{name: c.state_dict() for name, c in stateful.items()}, "rng": rng_state(self.env.device),
                        "step": step}, f)
        dist.barrier()
        if self.env.is_main:
            stage = engine.zero_optimization_stage()
            atomic_write_text(os.path.join(folder, "meta.json"), json.dumps(
                {"step": step, "world_size": self.env.world_size, "zero_stage": stage, **self.run_facts}))
            atomic_write_text(os.path.join(self.dir, "latest"), tag)
            self._prune(keep=tag)
        dist.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        """Delete all but the newest `self.keep` checkpoints (and universal copies made of them)."""
        tags = sorted(t for t in os.listdir(self.dir) if re.fullmatch(r"step\d{8}", t))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep:
                for folder in (old, f"{old}_universal"):
                    shutil.rmtree(os.path.join(self.dir, folder), ignore_errors=True)

    def export(self, tag: str, folder: str, name: str, model, epoch: float) -> tuple[str, str]:
        """The fp32 weights of checkpoint `tag`, consolidated from ZeRO's shards (rank 0 only), twice: FOLDER/NAME in
        mae_st's format (what --pretrained and the official tools read), and FOLDER/encoder (a pretraining model's
        encoder) or FOLDER/model (a classifier), safetensors and config.json, which anyone opens with
        models.from_pretrained. Returns both paths."""
        weights = fp32_weights(self.dir, tag)
        os.makedirs(folder, exist_ok=True)
        write_checkpoint(from_ours(weights, "mae_st"), os.path.join(folder, name), "mae_st", epoch=epoch)
        fresh = type(model)(model.cfg)
        fresh.load_state_dict(weights)
        pretraining = isinstance(fresh, MaskedAutoencoder)
        opened = os.path.join(folder, "encoder" if pretraining else "model")
        save_pretrained(encoder_of(fresh) if pretraining else fresh, opened)
        return os.path.join(folder, name), opened


def place_optimizer_state(optimizer) -> None:
    """Every state tensor of a torch optimizer where its kind of step needs it, as torch's own load_state_dict puts it
    (torch/optim/optimizer.py, _process_value_according_to_param_policy): moments on the parameter's device and
    dtype; `step` a float32 tensor, on the parameter's device for a fused (or capturable) optimizer. DeepSpeed's
    universal loader writes the states itself (runtime/base_optimizer.py, zero/stage3.py: state['step'] from the file
    as loaded), so a fused AdamW on a GPU would meet a step on the CPU."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if key == "step":
                    step = value if torch.is_tensor(value) else torch.tensor(float(value))
                    state[key] = step.to(device=param.device if on_device else "cpu", dtype=torch.float32)
                elif torch.is_tensor(value) and value.is_floating_point():
                    state[key] = value.to(device=param.device, dtype=param.dtype)


def latest_tag(checkpoints: str) -> str | None:
    """The tag the `latest` pointer of the folder `checkpoints` names: its newest whole checkpoint (None: none)."""
    path = os.path.join(checkpoints, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def fp32_weights(checkpoints: str, tag: str | None = None) -> dict:
    """The whole fp32 master weights of DeepSpeed checkpoint `tag` (default: `latest`) in the folder `checkpoints`.

    DeepSpeed's zero_to_fp32 reads ZeRO-1/2/3 checkpoints, but refuses those of its BF16_Optimizer, which it uses for
    bf16 with ZeRO-1 and fp32 gradient accumulation (ds_configs/zero1_bf16.json): their optimizer state records no
    zero_stage ("... is not a zero checkpoint"). Their fp32 master weights are flat partitions laid out as ZeRO-1/2's
    (each group's parameters concatenated in order, padded at the end, cut into equal parts by rank), read here."""
    tag = tag or latest_tag(checkpoints)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(checkpoints, tag=tag)
    except ValueError as err:
        if "is not a zero checkpoint" not in str(err):
            raise
    folder = os.path.join(checkpoints, tag)
    by_rank = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")),
                     key=lambda path: int(re.search(r"pp_rank_(\d+)_", path)[1]))
    partitions = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                  ["single_partition_of_fp32_groups"] for path in by_rank]
    model = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    state = {}
    for group, shapes in enumerate(model["param_shapes"]):
        flat, offset = torch.cat([parts[group] for parts in partitions]), 0
        for name, shape in shapes.items():
            state[name] = flat.narrow(0, offset, shape.numel()).view(shape).clone()
            offset += shape.numel()
    return state


def convert_to_universal(source: str, target: str) -> None:
    """DeepSpeed's universal checkpoint of the checkpoint folder `source`, made in `target`.partial and renamed to
    `target` when whole."""
    partial = f"{target}.partial"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
               "--output_folder", partial, "--inject_missing_state"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {source} to a universal checkpoint failed; resume with the number of "
                           f"processes that wrote it, or run by hand: {' '.join(command)}\n{result.stderr[-2000:]}")
    os.replace(partial, target)


def _wait_for(done: str, failed: str, what: str, poll: float = 1.0) -> None:
    """Wait (outside any collective) until the folder `done` or the file `failed` appears."""
    start = last_note = time.monotonic()
    while not os.path.isdir(done):
        if os.path.exists(failed):
            with open(failed) as f:
                raise RuntimeError(f"{what} failed: {f.read()}")
        if time.monotonic() - last_note > 60:
            log.info("still waiting for %s (%.0f s)", what, time.monotonic() - start)
            last_note = time.monotonic()
        time.sleep(poll)


def write_checkpoint(state, path: str, fmt: str, **extra) -> None:
    """An already-converted state dict written whole in its format's file (mae_st 'model', SlowFast 'model_state')."""
    with atomic_file(path) as f:
        torch.save(to_container(state, fmt, **extra), f)


def read_weights(source):
    """What load_pretrained / read_state_dict take: a file path or dict as given; a run folder, its checkpoints/
    folder or one DeepSpeed checkpoint folder as the fp32 weights consolidated from ZeRO's shards."""
    if not (isinstance(source, (str, os.PathLike)) and os.path.isdir(source)):
        return source
    folder = str(source)
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        folder = os.path.join(folder, "checkpoints")
    if latest_tag(folder):
        return fp32_weights(folder)
    parent, tag = os.path.split(os.path.normpath(folder))
    if not os.path.exists(os.path.join(folder, "mp_rank_00_model_states.pt")):
        raise ValueError(f"{folder} is a folder but not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt, "
                         "no latest, no checkpoints/)")
    return fp32_weights(parent, tag)
