"""Weights anyone opens without this project's trainer: a model as `model.safetensors` beside a `config.json` that
says how to build it, the layout Hugging Face's hub and timm read. A pretraining run exports its encoder this way,
a fine-tuning run its classifier (trainer/checkpointing.py); `from_pretrained(folder)`, or
`torch.hub.load(repo, "from_pretrained", folder, source="local")` (hubconf.py), returns the model, weights exact.

    from models import from_pretrained
    encoder = from_pretrained("runs/demo_pt/export/encoder")      # a VideoViT: encoder.encode(encoder.embed(x))
"""

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from models.classifier import VideoClassifier
from models.config import ClassifierConfig, VideoViTConfig
from models.encoder import VideoViT

ARCHITECTURES = {"VideoViT": (VideoViT, VideoViTConfig), "VideoClassifier": (VideoClassifier, ClassifierConfig)}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_pretrained(model: torch.nn.Module, folder: str) -> None:
    """Write `model` (a VideoViT encoder or a VideoClassifier) as folder/model.safetensors and folder/config.json."""
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise ValueError(f"save_pretrained writes {sorted(ARCHITECTURES)}, not {architecture}")
    os.makedirs(folder, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS), metadata={"architecture": architecture})
    config = {"architecture": architecture, **dataclasses.asdict(model.cfg)}
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(config, f, indent=1)


def encoder_of(model: torch.nn.Module) -> VideoViT:
    """The VideoViT encoder of a pretraining model (its decoder left out), weights shared."""
    fields = {f.name for f in dataclasses.fields(VideoViTConfig)}
    encoder = VideoViT(VideoViTConfig(**{k: v for k, v in dataclasses.asdict(model.cfg).items() if k in fields}))
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if k in encoder.state_dict()})
    return encoder


def from_pretrained(folder: str, device: str = "cpu") -> torch.nn.Module:
    """The model saved in `folder` by save_pretrained, in eval mode."""
    with open(os.path.join(folder, CONFIG)) as f:
        config = json.load(f)
    architecture = config.pop("architecture", None)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{folder}/{CONFIG} names architecture {architecture!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    module, config_type = ARCHITECTURES[architecture]
    model = module(config_type(**config))
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS), device=str(device)))
    return model.to(device).eval()
