"""A pretrained MAE-ST's reconstruction loss over ALL its masked tokens (the decoder at decoder_keep 1, whatever it
was trained with), on one split's videos, with masks fixed by a seed: runs trained differently (decoder masking,
another blr, ...) compared on one footing.

    python tools/reconstruction_loss.py --recipe demo_PT --data demo_data/shards --checkpoint runs/demo_pt
    python tools/reconstruction_loss.py --recipe k400_VIT_L_16x4_MAE_PT --data shards/k400 --split val \\
        --checkpoint runs/vit_l_dm50 --videos 2000

The views are the test views of fine-tuning (--clips temporal clips of each video, the center crop), in order, so
two runs are scored on the same pixels under the same masks. Recipe overrides work as in the trainers (key=value).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dali_pipes import VideoLoader  # noqa: E402
from models import MaskedAutoencoder, load_pretrained  # noqa: E402
from models.config import MAEConfig, resolve_config  # noqa: E402
from trainer.checkpointing import read_weights  # noqa: E402
from trainer.data import eval_config, loader_config  # noqa: E402
from trainer.engine import DistEnv  # noqa: E402
from trainer.recipes import PRETRAIN_RECIPES, resolve_recipe  # noqa: E402


def reconstruction_loss(model: MaskedAutoencoder, loader, mask_ratio: float, seed: int, videos: int | None) -> dict:
    """Mean squared error (normalized pixels) over every masked token of every view, each batch's masks drawn from
    a generator seeded with `seed`; at most `videos` videos."""
    generator = torch.Generator().manual_seed(seed)
    total, tokens, seen = 0.0, 0, 0
    views_per_video = loader.config.views.views_per_clip
    with torch.no_grad(), tqdm(total=videos or len(loader) * loader.config.batch_size, unit="video") as bar:
        for batch in loader:
            clips = batch["video"].float()
            noise = torch.rand(clips.shape[0], model.cfg.num_patches, generator=generator)
            loss, _, mask = model(clips, mask_ratio=mask_ratio, noise=noise)
            total, tokens = total + loss.item() * mask.sum().item(), tokens + int(mask.sum().item())
            seen += clips.shape[0] // views_per_video
            bar.update(clips.shape[0] // views_per_video)
            if videos and seen >= videos:
                break
    return {"loss": total / max(tokens, 1), "videos": seen, "views": seen * views_per_video, "masked_tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="the pretraining recipe the checkpoint was trained with")
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py")
    p.add_argument("--checkpoint", required=True, help="a run folder, a DeepSpeed checkpoint or an mae_st file")
    p.add_argument("--split", default="val")
    p.add_argument("--clips", type=int, default=2, help="temporal clips per video (center crop)")
    p.add_argument("--videos", type=int, default=None, help="at most this many videos (default: the whole split)")
    p.add_argument("--seed", type=int, default=0, help="of the masks")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = p.parse_args(argv)
    recipe = resolve_recipe(PRETRAIN_RECIPES, args.recipe, args.overrides)
    cfg = resolve_config(MAEConfig, recipe.model.name, **{**recipe.model.options, "decoder_keep": 1.0})
    model = MaskedAutoencoder(cfg).eval()
    print(load_pretrained(model, read_weights(args.checkpoint)))
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    train = loader_config(recipe, args.data, env, micro_batch=2 * args.clips, dtype=torch.float32)
    loader = VideoLoader(eval_config(train, args.split, args.clips, 1))
    try:
        found = reconstruction_loss(model, loader, recipe.masking.mask_ratio, args.seed, args.videos)
    finally:
        loader.close()
    print(f"reconstruction loss over all masked tokens: {found['loss']:.4f} ({found['videos']} videos of "
          f"{args.split}, {found['views']} views, {found['masked_tokens']} masked tokens, mask ratio "
          f"{recipe.masking.mask_ratio}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
