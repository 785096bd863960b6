"""What a frozen encoder makes of each view, without masking: the features feature extraction writes
(tools/extract_features.py), the probes read (trainer/probes.py) and pretraining tracks (trainer/tracking.py).

Per view and chosen block: the mean of its patch tokens and its class token, and optionally the token grid. Blocks
count from 1; "final" is the last block's tokens through the encoder's final LayerNorm, what mae_st's encoder hands
its decoder. Any checkpoint the project reads gives its encoder: a run folder (its model configuration), an exported
folder (models/hub.py), an mae_st or SlowFast file (the configuration read from its shapes).
"""

import dataclasses
import json
import os

import torch

from models import MODEL_SIZES, from_pretrained
from models.checkpoints import PRETRAIN_ONLY_PREFIXES, infer_options, read_state_dict, to_ours
from models.config import VideoViTConfig
from models.encoder import VideoViT
from models.hub import CONFIG
from trainer.checkpointing import read_weights

FINAL = "final"


def load_encoder(source: str, **options) -> VideoViT:
    """The frozen encoder (eval mode) of a checkpoint in any format this project reads; `options` (VideoViTConfig
    fields) fill in what a file's shapes do not tell (num_heads) or change nothing else."""
    saved = {}  # a folder's config.json: an export's (models/hub.py) or a run's (trainer/setup.py)
    if os.path.isdir(source) and os.path.exists(os.path.join(source, CONFIG)):
        with open(os.path.join(source, CONFIG)) as f:
            saved = json.load(f)
    if "architecture" in saved:
        return from_pretrained(source)
    state, fmt = read_state_dict(read_weights(source))
    weights = {k: v for k, v in to_ours(state, fmt).items() if not k.startswith((*PRETRAIN_ONLY_PREFIXES, "head."))}
    if "model" in saved:  # one of our run folders: the model it trained
        built = saved["model"]
    else:  # a file: its shapes tell all but the heads, which follow the official sizes' widths
        built = infer_options(weights)
        heads = {size["embed_dim"]: size["num_heads"] for size in MODEL_SIZES.values()}
        built["num_heads"] = heads.get(built["embed_dim"], max(1, built["embed_dim"] // 64))
    fields = {f.name for f in dataclasses.fields(VideoViTConfig)}
    encoder = VideoViT(VideoViTConfig(**{**{k: v for k, v in built.items() if k in fields}, **options}))
    encoder.load_state_dict(weights)
    return encoder.eval()


def block_names(encoder: VideoViT, blocks: list) -> list[str]:
    """The names of `blocks` (1-based numbers, or "final"), checked against the encoder's depth."""
    names = []
    for block in blocks:
        if block == FINAL:
            names.append(FINAL)
        elif str(block).isdigit() and 1 <= int(block) <= encoder.cfg.depth:
            names.append(f"block{int(block)}")
        else:
            raise ValueError(f"block {block!r}: this encoder has blocks 1-{encoder.cfg.depth}, or {FINAL!r}")
    return names


@torch.no_grad()
def view_features(encoder: VideoViT, video: torch.Tensor, names: list[str], tokens: bool = False) -> dict:
    """{"{name}.mean": [N, D], "{name}.cls": [N, D], and with tokens "{name}.tokens": [N, L, D]} of a batch of views
    [N, C, T, H, W] for the block names of block_names()."""
    outputs = encoder.encode(encoder.embed(video), every_block=True)
    found = {}
    for name in names:
        x = encoder.norm(outputs[-1]) if name == FINAL else outputs[int(name.removeprefix("block")) - 1]
        found[f"{name}.mean"], found[f"{name}.cls"] = x[:, 1:].mean(dim=1), x[:, 0]
        if tokens:
            found[f"{name}.tokens"] = x[:, 1:]
    return found
