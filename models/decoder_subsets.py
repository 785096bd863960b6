"""Which masked tokens the decoder reconstructs when it reconstructs only some (MAEConfig.decoder_keep < 1).

A policy is a rule that ranks the tokens of a view: given the grid (T', H', W') and uniform noise [B, L] drawn for
this view alone, it returns ranks [B, L] >= 0, and the decoder takes the masked tokens of lowest rank. So a new
policy is one entry here, never a branch in the model.

- random: uniformly among the masked tokens, each view its own draw (CrossMAE, Fu et al. 2024, decodes such a
  random subset of the masked patches of images at equal accuracy).
- running_cell: VideoMAE V2's decoder mask (Wang et al. 2023, "dual masking"): in every 2 x 2 cell of the spatial
  grid the decoded positions take turns, shifting by one position per time step, so that at keep 0.5 every cell and
  every frame is half reconstructed. Made for tube masking; with random space-time masking it still spreads the
  decoded tokens evenly, the noise breaking ties.
"""

import torch


def _random(grid: tuple[int, int, int], noise: torch.Tensor) -> torch.Tensor:
    return noise


def _running_cell(grid: tuple[int, int, int], noise: torch.Tensor) -> torch.Tensor:
    t, h, w = (torch.arange(n, device=noise.device) for n in grid)
    cell = (h[:, None] % 2) * 2 + w[None, :] % 2  # [H', W']: a position's place in its 2 x 2 cell
    turn = (cell[None] - t[:, None, None]) % 4  # [T', H', W']: which positions go first at each time step
    return turn.flatten().to(noise.dtype) + noise  # noise in [0, 1) orders the tokens of equal turn


DECODER_SUBSETS = {"random": _random, "running_cell": _running_cell}
