"""The picture people look at to see whether MAE learns: for a few clips, the target frames, what the encoder saw
(the 10% visible patches) and the reconstruction (predicted patches with the visible ones pasted back)."""

import torch
from einops import rearrange

from dali_pipes.normalization import MEAN, STD


@torch.no_grad()
def reconstruction_grid(model, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mask_repeats: int,
                        clips: int = 2) -> torch.Tensor:
    """[3, H', W'] image in [0, 1]: per clip three rows (target, masked input, reconstruction), one column per
    target frame. videos [N, C, T, H, W] normalized; pred [N*M, L, P] and mask [N*M, L] as the model returned them."""
    n = min(clips, videos.shape[0])
    rows = torch.arange(n, device=pred.device) * mask_repeats  # each clip's first mask
    pred, mask = pred[rows].float(), mask[rows].float().unsqueeze(-1)  # [n, L, P], [n, L, 1]
    patches = model.patchify(videos[:n].float())  # [n, L, P]
    if model.cfg.norm_pix_loss:  # predictions are in per-patch normalized units: undo with the target's statistics
        pred = pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    gray = (127.5 - MEAN) / STD
    kinds = [patches, patches * (1 - mask) + gray * mask, patches * (1 - mask) + pred * mask]
    frames = torch.stack([model.unpatchify(k) for k in kinds], dim=1)  # [n, 3 kinds, C, t, H, W]
    pixels = (frames * STD + MEAN) / 255
    return rearrange(pixels.clamp(0, 1).cpu(), "n k c t h w -> c (n k h) (t w)")
