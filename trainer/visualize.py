"""The picture people look at to see whether MAE learns: for a few clips, the target frames, what the encoder saw
(the 10% visible patches) and the reconstruction (predicted patches with the visible ones pasted back); and the hook
that draws it every so many steps and at the last one."""

import torch
from einops import rearrange

from dali_pipes.normalization import MEAN, STD
from models.mae import patch_statistics
from trainer.cadence import due
from trainer.task import Hook


@torch.no_grad()
def reconstruction_grid(model, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mask_repeats: int,
                        clips: int = 2) -> torch.Tensor:
    """[3, H', W'] image in [0, 1]: per clip three rows (target, masked input, reconstruction), one column per
    target frame. videos [N, C, T, H, W] normalized; pred [N*M, L, P] and mask [N*M, L] as the model returned them."""
    n = min(clips, videos.shape[0])
    rows = torch.arange(n, device=pred.device) * mask_repeats  # each clip's first mask
    pred, mask = pred[rows].float(), mask[rows].float().unsqueeze(-1)  # [n, L, P], [n, L, 1]
    patches = model.patchify(videos[:n].float())  # [n, L, P]
    reconstructed = pred.abs().sum(-1, keepdim=True) > 0  # [n, L, 1]: all but what decoder masking left out (0s)
    if model.cfg.norm_pix_loss:  # predictions are in per-patch normalized units: undo with the target's statistics
        mean, std = patch_statistics(patches)
        pred = pred * std + mean
    gray = (127.5 - MEAN) / STD
    pred = torch.where(reconstructed, pred, gray)  # (a left-out token shown gray, as in the masked input)
    kinds = [patches, patches * (1 - mask) + gray * mask, patches * (1 - mask) + pred * mask]
    frames = torch.stack([model.unpatchify(k) for k in kinds], dim=1)  # [n, 3 kinds, C, t, H, W]
    pixels = (frames * STD + MEAN) / 255
    return rearrange(pixels.clamp(0, 1).cpu(), "n k c t h w -> c (n k h) (t w)")


class ReconstructionPictures(Hook):
    """Every `every` steps (and at the last one) the reconstruction grid, to TensorBoard and RUN_DIR/pictures/."""

    def __init__(self, model, monitor, every: int, last_step: int, mask_repeats: int):
        self.model, self.monitor, self.every, self.last_step = model, monitor, every, last_step
        self.mask_repeats, self.latest = mask_repeats, None

    def wants_outputs(self, step: int) -> bool:
        return due(step, self.every) or (bool(self.every) and step == self.last_step)

    def after_step(self, step: int, batch: dict | None, outputs) -> None:
        if batch is not None:
            pred, mask = outputs
            grid = reconstruction_grid(self.model.module, batch["video"], pred, mask, self.mask_repeats)
            self.latest = self.monitor.picture(step, grid)

    def summary(self) -> list[str]:
        return [f"  reconstructions (target / masked input / reconstruction): {self.latest}"] if self.latest else []
