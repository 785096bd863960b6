"""MAE-ST pretraining model: a sparse ViT encoder on the ~10% visible tubelets and a small decoder over all of them.

Shapes for the paper's setting (16 x 224 x 224 clips, 2 x 16 x 16 tubelets, 90% masking):
L = 8 x 14 x 14 = 1568 tokens, K = int(1568 x 0.1) = 156 visible, P = 16 x 16 x 3 = 768 values per target patch.

Repeated sampling of masks (`mask_repeats=M`): each clip is masked M times independently. The patch embedding and the
normalized targets are computed once per clip; only the encoder and decoder run M times. Rows of `pred` and `mask`
are clip-major: row n*M + m is clip n under its m-th mask.

Decoder masking (`decoder_keep` < 1, ours): the decoder runs on the K visible tokens plus Kd of the L - K masked
ones (models/decoder_subsets.py picks them, per view), and the loss and its targets cover those Kd only. At
decoder_keep = 1 (the default) the decoder runs on all L tokens in order, exactly mae_st's model.
"""

import torch
import torch.nn as nn
from einops import rearrange

from models.config import MAEConfig, resolve_config
from models.decoder_subsets import DECODER_SUBSETS
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
        n = tokens.shape[0]
        ids_keep, ids_restore, mask = self.random_masking(noise, self.cfg.visible_tokens(mask_ratio))
        clip = torch.arange(n, device=tokens.device).repeat_interleave(mask_repeats)  # [N*M]: row -> its clip
        visible = tokens[clip[:, None], ids_keep]  # [N*M, K, D]
        return self.norm(self.encode(visible)), mask, ids_restore

    def decoded_tokens(self, mask: torch.Tensor, ids_restore: torch.Tensor, mask_ratio: float,
                       noise: torch.Tensor) -> torch.Tensor:
        """The tokens the decoder runs on when it reconstructs only some, as positions [B, K+Kd]: the K visible ones
        in the encoder's order (that of the latent), then the Kd masked ones the subset policy ranks first."""
        rank = DECODER_SUBSETS[self.cfg.decoder_subset](self.cfg.grid, noise)  # [B, L] >= 0
        visible_first = torch.where(mask.bool(), rank, (ids_restore - mask.shape[1]).to(rank.dtype))  # visible < 0
        kept = self.cfg.visible_tokens(mask_ratio) + self.cfg.decoded_masked(mask_ratio)
        return visible_first.argsort(dim=1)[:, :kept]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, decoded=None) -> torch.Tensor:
        """latent [B, 1+K, D] -> predictions [B, L, P] for every token in order (visible ones too), or, given
        `decoded` [B, K+Kd] from decoded_tokens, [B, K+Kd, P] for those tokens."""
        x = self.decoder_embed(latent)  # [B, 1+K, D_dec]
        b, k, dec = x.shape[0], x.shape[1] - 1, x.shape[2]
        positions = self.decoder_position_table()  # [1, 1+L, D_dec]
        if decoded is None:  # every token, in order: mae_st's decoder
            num_tokens = ids_restore.shape[1]
            shuffled = torch.cat([x[:, 1:], self.mask_token.expand(b, num_tokens - k, dec)], dim=1)  # visible first
            tokens = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dec))  # [B, L, D_dec] in order
        else:  # the visible tokens, then the kept masked ones, each with its own position
            tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, decoded.shape[1] - k, dec)], dim=1)
            positions = torch.cat([positions[:, :1].expand(b, -1, -1), positions[0, 1:][decoded]], dim=1)
        cls = x[:, :1] if self.cfg.decoder_cls == "encoder" else self.decoder_cls_token.expand(b, -1, -1)
        x = torch.cat([cls, tokens], dim=1) + positions  # [B, 1+L, D_dec] (or 1+K+Kd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, L, P] (or K+Kd)

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

    def targets(self, videos: torch.Tensor, tokens=None, mask_repeats: int = 1) -> torch.Tensor:
        """[N, L, P] fp32 targets: each patch normalized by its own mean and (unbiased) variance if norm_pix_loss;
        given tokens [N*M, S] (positions per masked view), only those: [N*M, S, P]."""
        target = self.patchify(videos.float())
        if tokens is not None:
            clip = torch.arange(videos.shape[0], device=videos.device).repeat_interleave(mask_repeats)
            target = target[clip[:, None], tokens]
        if self.cfg.norm_pix_loss:
            mean, std = patch_statistics(target)
            target = (target - mean) / std
        return target

    def forward(self, videos: torch.Tensor, mask_ratio: float = 0.9, noise=None, mask_repeats: int = 1,
                decoder_noise=None):
        """videos [N, C, T, H, W] -> (loss, pred [N*M, L, P], mask [N*M, L]).

        noise [N*M, L] makes the masking deterministic (argsort of noise), decoder_noise [N*M, L] the decoder's
        subset (decoder_keep < 1); by default both are uniform random. Tokens the decoder did not reconstruct are
        0 in pred (a patch's mean, in normalized units)."""
        n, m, num_tokens = videos.shape[0], mask_repeats, self.cfg.num_patches
        noise = _uniform_noise(noise, "noise", (n * m, num_tokens), videos.device)
        latent, mask, ids_restore = self.forward_encoder(videos, mask_ratio, noise, m)
        if self.cfg.decodes_every_token:
            pred = self.forward_decoder(latent, ids_restore)
            return self.loss(videos, pred, mask, m), pred, mask
        k = latent.shape[1] - 1
        decoded = self.decoded_tokens(mask, ids_restore, mask_ratio, _uniform_noise(
            decoder_noise, "decoder_noise", (n * m, num_tokens), videos.device))
        pred = self.forward_decoder(latent, ids_restore, decoded)  # [N*M, K+Kd, P]
        loss = self.loss(videos, pred[:, k:], mask, m, decoded[:, k:])
        with torch.no_grad():  # each reconstruction in its token's place, for pictures
            every = pred.new_zeros(n * m, num_tokens, pred.shape[-1])
            every.scatter_(1, decoded.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred)
        return loss, every, mask

    def loss(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mask_repeats: int,
             tokens=None) -> torch.Tensor:
        """Mean squared error over the removed tokens only: pred [N*M, L, P] against the targets of videos [N, ...],
        or, given the positions tokens [N*M, S] that pred [N*M, S, P] holds, against those tokens' targets."""
        n, m = videos.shape[0], mask_repeats
        if tokens is None:  # every token: the targets once per clip, shared by its M masks
            target = self.targets(videos).unsqueeze(1)  # [N, 1, L, P]
        else:
            target = self.targets(videos, tokens, m).unflatten(0, (n, m))  # [N, M, S, P]
            mask = mask.gather(1, tokens)  # [N*M, S]
        per_token = (pred.float().unflatten(0, (n, m)) - target).pow(2).mean(-1)
        mask_nm = mask.unflatten(0, (n, m))
        return (per_token * mask_nm).sum() / mask_nm.sum()


def _uniform_noise(given, name: str, shape: tuple, device) -> torch.Tensor:
    """`given` after checking its shape, or uniform noise of `shape`."""
    if given is None:
        return torch.rand(*shape, device=device)
    if tuple(given.shape) != shape:
        raise ValueError(f"{name} must be [N*mask_repeats, L] = {list(shape)}, got {list(given.shape)}")
    return given


def build_pretrain_model(name: str = "vit_b", **overrides) -> MaskedAutoencoder:
    """MAE-ST pretraining model of size vit_b | vit_l | vit_h | vit_tiny; overrides use mae_st's constructor names."""
    return MaskedAutoencoder(resolve_config(MAEConfig, name, **overrides))
