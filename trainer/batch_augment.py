"""The fine-tuning augmentations that act on whole batches, in torch on the training device after the loader:
mixup / cutmix with label smoothing (they pair clips of a batch) and random erasing (timm's 'pixel' mode).
For video the cutmix box and the erased box are the same for every frame of a clip. Random draws come from the
global numpy and torch generators, which checkpoints save and restore."""

import math

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1 - smoothing + off)


def mixup_cutmix(video: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
                 switch_prob: float, smoothing: float):
    """timm's batch mode: each clip mixed with the clip at the mirrored position of the batch, by mixup
    (Beta(mixup) blend) or cutmix (a Beta(cutmix)-sized box pasted). video [N, C, T, H, W], labels [N]
    -> (video, soft targets [N, classes])."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    use_cutmix = cutmix > 0 and (mixup <= 0 or np.random.rand() < switch_prob)
    if mixup <= 0 and not use_cutmix:
        return video, targets
    lam = float(np.random.beta(cutmix, cutmix) if use_cutmix else np.random.beta(mixup, mixup))
    mirrored = video.flip(0)
    if use_cutmix:
        height, width = video.shape[-2:]
        cut = math.sqrt(1 - lam)
        cy, cx = np.random.randint(height), np.random.randint(width)
        y0, y1 = max(cy - int(height * cut) // 2, 0), min(cy + int(height * cut) // 2, height)
        x0, x1 = max(cx - int(width * cut) // 2, 0), min(cx + int(width * cut) // 2, width)
        video = video.clone()
        video[..., y0:y1, x0:x1] = mirrored[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the share actually kept
    else:
        video = video * lam + mirrored * (1 - lam)
    return video, targets * lam + targets.flip(0) * (1 - lam)


def random_erasing(video: torch.Tensor, probability: float, area=(0.02, 1 / 3), aspect=(0.3, 3.3)) -> torch.Tensor:
    """Per clip, with `probability`, one box (the same in every frame) filled with normal noise."""
    if probability <= 0:
        return video
    video = video.clone()
    height, width = video.shape[-2:]
    for clip in video:  # [C, T, H, W]
        if np.random.rand() >= probability:
            continue
        for _ in range(10):  # timm's attempts at a box that fits
            target = height * width * np.random.uniform(*area)
            ratio = math.exp(np.random.uniform(math.log(aspect[0]), math.log(aspect[1])))
            h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if h < height and w < width:
                y, x = np.random.randint(0, height - h + 1), np.random.randint(0, width - w + 1)
                clip[:, :, y:y + h, x:x + w] = torch.randn(clip.shape[0], 1, h, w, device=clip.device)
                break
    return video
