"""Model-only demo (until the trainer lands): a tiny MAE-ST learns to reconstruct generated moving-square clips.

Prints the masked-reconstruction loss as it falls, then the compute counts of the paper-sized models.
"""

import time

import torch

from models import build_pretrain_model, classifier_macs, pretrain_macs
from models.config import ClassifierConfig, MAEConfig, resolve_config


def moving_squares(n: int, frames: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, frames, size, size] clips: a coloured square moving in a random direction over a dark background."""
    gen = torch.Generator().manual_seed(seed)
    videos = torch.full((n, 3, frames, size, size), -1.0)
    side = size // 4
    for i in range(n):
        start = torch.randint(0, size - side, (2,), generator=gen)
        step = torch.randint(-2, 3, (2,), generator=gen)
        colour = torch.rand(3, 1, 1, generator=gen) * 2
        for t in range(frames):
            y, x = ((start + step * t) % (size - side)).tolist()
            videos[i, :, t, y:y + side, x:x + side] = colour
    return videos


def main() -> None:
    torch.manual_seed(0)
    model = build_pretrain_model("vit_tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    videos = moving_squares(16)
    print(f"tiny MAE-ST: {sum(p.numel() for p in model.parameters()):,} parameters, clips {list(videos.shape)}, "
          "90% masking, 4 masks per clip")
    start = time.time()
    for step in range(1, 201):
        loss, _, _ = model(videos, mask_ratio=0.9, mask_repeats=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"200 steps in {time.time() - start:.1f} s")
    for name in ("vit_b", "vit_l", "vit_h"):
        pt, ft = resolve_config(MAEConfig, name), resolve_config(ClassifierConfig, name)
        print(f"{name}: pretraining {pretrain_macs(pt) / 1e9:.1f} G multiply-adds per clip at 90% masking "
              f"(dense {pretrain_macs(pt, dense_encoder=True) / 1e9:.1f} G), fine-tuning {classifier_macs(ft) / 1e9:.0f} G per view")


if __name__ == "__main__":
    main()
