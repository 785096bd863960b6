"""MAE-ST pretraining model: a sparse ViT encoder on the ~10% visible tubelets and a small decoder over all of them.

Shapes for the paper's setting (16 x 224 x 224 clips, 2 x 16 x 16 tubelets, 90% masking):
L = 8 x 14 x 14 = 1568 tokens, K = int(1568 x 0.1) = 156 visible, P = 16 x 16 x 3 = 768 values per target patch.

Repeated sampling of masks (`mask_repeats=M`): each clip is masked M times independently. The patch embedding and the
normalized targets are computed once per clip; only the encoder and decoder run M times. Rows of `pred` and `mask`
are clip-major: row n*M + m is clip n under its m-th mask.
"""

import torch
import torch.nn as nn
from einops import rearrange

from models.config import MAEConfig, resolve_config
from models.encoder import VideoViT
from models.layers import Block, LayerNorm, init_weights, separable_pos_embed


def decoder_tables(cfg: MAEConfig) -> dict:
    """{name: shape} of the decoder's position tables and cls token in the config's layout."""
    t, h, w = cfg.grid
    dec = cfg.decoder_embed_dim
    if cfg.decoder_pos_embed == "separable":
        tables = dict(decoder_pos_embed_spatial=(1, h * w, dec), decoder_pos_embed_temporal=(1, t, dec),
                      decoder_pos_embed_class=(1, 1, dec))
    else:
        tables = dict(decoder_pos_embed=(1, 1 + t * h * w, dec))
    if cfg.decoder_cls == "learned":
        tables["decoder_cls_token"] = (1, 1, dec)
    return tables


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and standard deviation ([..., 1] each) as the normalized-pixel loss takes them: the unbiased
    variance plus 1e-6 (mae_st's and SlowFast's norm_pix_loss)."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


class MaskedAutoencoder(VideoViT):
    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        dec = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_blocks = nn.ModuleList(
            Block(dec, cfg.decoder_heads, cfg.mlp_ratio, not cfg.no_qkv_bias, 0.0, cfg.attn_impl)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = LayerNorm(dec)
        self.decoder_pred = nn.Linear(dec, cfg.patch_dim)
        # the decoder's position tables and cls input, as the official layout has them (config.py: mae_st's
        # separable tables and learned cls token, or SlowFast's joint table and the encoder's cls output)
        for name, shape in decoder_tables(cfg).items():
            setattr(self, name, nn.Parameter(nn.init.trunc_normal_(torch.zeros(shape), std=0.02)))
        self.register_buffer("target_frame_ids", torch.tensor(cfg.target_frame_indices), persistent=False)
        init_weights(self, trunc=cfg.trunc_init)
        self.init_tokens()
        nn.init.normal_(self.mask_token, std=0.02)

    def decoder_position_table(self) -> torch.Tensor:
        """[1, 1+L, D_dec]: the cls entry first, then the tokens in time-major order."""
        if self.cfg.decoder_pos_embed == "joint":
            return self.decoder_pos_embed
        patches = separable_pos_embed(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        return torch.cat([self.decoder_pos_embed_class, patches], dim=1)

    # --- forward ---------------------------------------------------------------------------------------------------

    @staticmethod
    def random_masking(noise: torch.Tensor, num_keep: int):
        """Per-row shuffle by argsort of noise [B, L]: the num_keep smallest-noise tokens stay visible.

        Returns ids_keep [B, K], ids_restore [B, L] (a token's rank in the shuffle) and mask [B, L], 1 = removed."""
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = (ids_restore >= num_keep).to(noise.dtype)
        return ids_shuffle[:, :num_keep], ids_restore, mask

    def forward_encoder(self, videos: torch.Tensor, mask_ratio: float, noise: torch.Tensor, mask_repeats: int):
        """videos [N, C, T, H, W] -> latent [N*M, 1+K, D], mask [N*M, L], ids_restore [N*M, L]."""
        tokens = self.embed(videos)  # [N, L, D], once per clip
        n, num_tokens = tokens.shape[:2]
        ids_keep, ids_restore, mask = self.random_masking(noise, int(num_tokens * (1 - mask_ratio)))
        clip = torch.arange(n, device=tokens.device).repeat_interleave(mask_repeats)  # [N*M]: row -> its clip
        visible = tokens[clip[:, None], ids_keep]  # [N*M, K, D]
        return self.norm(self.encode(visible)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D] -> predictions [B, L, P] for every token (visible ones too)."""
        x = self.decoder_embed(latent)  # [B, 1+K, D_dec]
        b, k, dec = x.shape[0], x.shape[1] - 1, x.shape[2]
        num_tokens = ids_restore.shape[1]
        shuffled = torch.cat([x[:, 1:], self.mask_token.expand(b, num_tokens - k, dec)], dim=1)  # visible first
        tokens = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dec))  # [B, L, D_dec] in order
        cls = x[:, :1] if self.cfg.decoder_cls == "encoder" else self.decoder_cls_token.expand(b, -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.decoder_position_table()  # [B, 1+L, D_dec]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, L, P]

    def patchify(self, videos: torch.Tensor) -> torch.Tensor:
        """The target frames of [N, C, T, H, W] clips as [N, L, P] patches, each patch's values ordered (frame, row,
        column, channel) as in both official codebases."""
        frames = videos.index_select(2, self.target_frame_ids)  # [N, C, pred_t_dim, H, W]
        p, u = self.cfg.patch_size, self.cfg.frames_per_token
        return rearrange(frames, "n c (t u) (h p) (w q) -> n (t h w) (u p q c)", u=u, p=p, q=p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of patchify: [N, L, P] -> [N, C, pred_t_dim, H, W]."""
        t, h, w = self.cfg.grid
        p, u = self.cfg.patch_size, self.cfg.frames_per_token
        return rearrange(patches, "n (t h w) (u p q c) -> n c (t u) (h p) (w q)", t=t, h=h, w=w, u=u, p=p, q=p)

    def targets(self, videos: torch.Tensor) -> torch.Tensor:
        """[N, L, P] fp32 targets: each patch normalized by its own mean and (unbiased) variance if norm_pix_loss."""
        target = self.patchify(videos.float())
        if self.cfg.norm_pix_loss:
            mean, std = patch_statistics(target)
            target = (target - mean) / std
        return target

    def forward(self, videos: torch.Tensor, mask_ratio: float = 0.9, noise=None, mask_repeats: int = 1):
        """videos [N, C, T, H, W] -> (loss, pred [N*M, L, P], mask [N*M, L]).

        noise [N*M, L] makes the masking deterministic (argsort of noise); by default it is uniform random."""
        n, m, num_tokens = videos.shape[0], mask_repeats, self.cfg.num_patches
        if noise is None:
            noise = torch.rand(n * m, num_tokens, device=videos.device)
        elif tuple(noise.shape) != (n * m, num_tokens):
            raise ValueError(f"noise must be [N*mask_repeats, L] = [{n * m}, {num_tokens}], got {list(noise.shape)}")
        latent, mask, ids_restore = self.forward_encoder(videos, mask_ratio, noise, m)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(videos, pred, mask, m), pred, mask

    def loss(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mask_repeats: int) -> torch.Tensor:
        """Mean squared error over the removed tokens only; pred [N*M, L, P] against the targets of videos [N, ...]."""
        n, m, num_tokens = videos.shape[0], mask_repeats, self.cfg.num_patches
        per_token = (pred.float().view(n, m, num_tokens, -1) - self.targets(videos).unsqueeze(1)).pow(2).mean(-1)
        mask_nm = mask.view(n, m, num_tokens)
        return (per_token * mask_nm).sum() / mask_nm.sum()


def build_pretrain_model(name: str = "vit_b", **overrides) -> MaskedAutoencoder:
    """MAE-ST pretraining model of size vit_b | vit_l | vit_h | vit_tiny; overrides use mae_st's constructor names."""
    return MaskedAutoencoder(resolve_config(MAEConfig, name, **overrides))
