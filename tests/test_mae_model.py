"""The MAE-ST pretraining model and the classifier on tiny sizes (CPU)."""

import dataclasses

import pytest
import torch

from models import build_classifier, build_pretrain_model
from models.attention import attention
from models.config import SLOWFAST_LAYOUT, MAEConfig, resolve_config


def tiny(**overrides):
    torch.manual_seed(0)
    return build_pretrain_model("vit_tiny", **overrides).eval()


def clips(n=2, frames=8, size=32, seed=1):
    return torch.randn(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_visible_count():
    model = tiny()
    num_tokens = model.cfg.num_patches  # 4 x 4 x 4
    for ratio in (0.9, 0.75, 0.5):
        latent, mask, _ = model.forward_encoder(clips(), ratio, torch.rand(2, num_tokens), 1)
        visible = int(num_tokens * (1 - ratio))
        assert latent.shape == (2, 1 + visible, model.cfg.embed_dim)
        assert (mask == 0).sum(1).tolist() == [visible, visible]
    loss, pred, mask = model(clips(), mask_ratio=0.9, mask_repeats=3)
    assert pred.shape == (6, num_tokens, 8 * 8 * 3 * model.cfg.frames_per_token)
    assert mask.shape == (6, num_tokens) and loss.ndim == 0


def test_paper_sizes_have_paper_token_counts():
    with torch.device("meta"):
        model = build_pretrain_model("vit_b")
    assert model.cfg.num_patches == 1568 and int(1568 * (1 - 0.9)) == 156
    assert model.cfg.patch_dim == 768
    assert model.cfg.target_frame_indices == [0, 2, 4, 6, 8, 10, 12, 15]  # mae_st: linspace(0, 15, 8), floored
    assert torch.linspace(0, 15, 8).long().tolist() == model.cfg.target_frame_indices
    with torch.device("meta"):
        model = build_pretrain_model("vit_b", **SLOWFAST_LAYOUT)
    assert model.cfg.target_frame_indices == [0, 2, 4, 6, 8, 10, 12, 14]  # SlowFast: every second frame
    assert model.target_frame_ids.shape == (8,)


def test_loss_ignores_predictions_at_visible_tokens():
    model = tiny()
    noise = torch.rand(2, model.cfg.num_patches)
    latent, mask, ids_restore = model.forward_encoder(clips(), 0.75, noise, 1)
    pred = model.forward_decoder(latent, ids_restore).detach().requires_grad_(True)
    target = model.targets(clips())
    loss = ((pred - target).pow(2).mean(-1) * mask).sum() / mask.sum()
    loss.backward()
    visible = mask == 0
    assert pred.grad[visible].abs().max() == 0
    assert pred.grad[~visible].abs().sum() > 0
    # and the model's own loss is exactly this masked mean
    full_loss, _, _ = model(clips(), mask_ratio=0.75, noise=noise)
    torch.testing.assert_close(full_loss, loss.detach())


def test_targets_are_per_patch_normalized():
    model = tiny()
    target = model.targets(clips() * 5 + 3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(target.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(target.shape[:2]), atol=1e-3, rtol=0)
    raw = tiny(norm_pix_loss=False)
    torch.testing.assert_close(raw.unpatchify(raw.targets(clips())), clips().index_select(2, raw.target_frame_ids))


def test_noise_makes_masking_deterministic():
    model = tiny()
    noise = torch.rand(2, model.cfg.num_patches)
    a = model(clips(), noise=noise)
    b = model(clips(), noise=noise)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert torch.equal(a[2], b[2])
    # the kept tokens are the ones with the smallest noise
    keep = int(model.cfg.num_patches * 0.1)
    assert torch.equal(a[2][0] == 0, noise[0] <= noise[0].sort().values[keep - 1])
    c = model(clips(), noise=torch.rand(2, model.cfg.num_patches))
    assert not torch.equal(a[2], c[2])


def test_mask_repeats_equals_separate_passes():
    model = tiny()
    n, m = 2, 3
    noise = torch.rand(n * m, model.cfg.num_patches)
    loss, pred, mask = model(clips(n), noise=noise, mask_repeats=m)
    per_mask = noise.view(n, m, -1)
    losses = []
    for j in range(m):
        loss_j, pred_j, mask_j = model(clips(n), noise=per_mask[:, j])
        torch.testing.assert_close(pred.view(n, m, *pred.shape[1:])[:, j], pred_j)
        assert torch.equal(mask.view(n, m, -1)[:, j], mask_j)
        losses.append(loss_j)
    torch.testing.assert_close(loss, torch.stack(losses).mean())


def test_mask_repeats_embeds_each_clip_once():
    model = tiny()
    calls = []
    model.patch_embed.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model(clips(2), mask_repeats=4)
    assert calls == [2]


def test_noise_shape_is_checked():
    model = tiny()
    with pytest.raises(ValueError, match=r"noise must be \[N\*mask_repeats, L\] = \[4, 64\]"):
        model(clips(2), noise=torch.rand(2, 64), mask_repeats=2)
    with pytest.raises(ValueError, match="expected videos"):
        model(torch.randn(2, 3, 8, 48, 48))


def test_bf16_autocast_forward_and_backward():
    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(clips(), mask_repeats=2)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # a bf16 model (what DeepSpeed's bf16 mode runs) gives the same loss to bf16 precision
    model_bf16 = tiny().to(torch.bfloat16)
    noise = torch.rand(2, 64)
    ref = tiny()(clips(), noise=noise)[0]
    out = model_bf16(clips().to(torch.bfloat16), noise=noise)[0]
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_attention_paths_agree():
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    torch.testing.assert_close(attention(q, k, v, "math"), attention(q, k, v, "sdpa"), rtol=1e-5, atol=1e-5)
    model_math, model_sdpa = tiny(attn_impl="math"), tiny(attn_impl="sdpa")
    noise = torch.rand(2, 64)
    torch.testing.assert_close(model_math(clips(), noise=noise)[0], model_sdpa(clips(), noise=noise)[0])


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny(grad_checkpointing=checkpointing).train()
        model(clips(), noise=torch.rand(2, 64, generator=torch.Generator().manual_seed(3)))[0].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_only_in_training():
    model = build_classifier("vit_tiny", num_classes=5, drop_path_rate=0.5, dropout=0.0)
    assert [round(b.drop_path.p, 2) for b in model.blocks] == [0.0, 0.5]  # linear in depth
    model.eval()
    torch.testing.assert_close(model(clips()), model(clips()))
    model.train()
    torch.manual_seed(0)
    outs = [model(clips(8)) for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1])


def test_classifier_pools_patch_tokens_not_cls():
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", num_classes=7).eval()
    logits = model(clips())
    assert logits.shape == (2, 7)
    assert model.head.weight.abs().max() < 1e-4  # head_init_scale 0.001 x std 0.02
    # changing the cls token changes every token through attention, so check pooling directly instead
    x = model.encode(model.embed(clips()))
    torch.testing.assert_close(model.forward_features(clips()), model.norm(x[:, 1:].mean(1)))
    assert not torch.allclose(model.forward_features(clips()), model.norm(x.mean(1)))


def test_unknown_and_unsupported_options_are_errors():
    with pytest.raises(TypeError, match="unknown option"):
        build_pretrain_model("vit_tiny", decoder_width=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_pretrain_model("vit_g")
    with pytest.raises(ValueError, match="sep_pos_embed=False is not supported"):
        build_pretrain_model("vit_tiny", sep_pos_embed=False)
    with pytest.raises(ValueError, match="pred_t_dim"):
        build_pretrain_model("vit_tiny", pred_t_dim=3)


# (option, bad value): vit_tiny is 8 frames x 32 px, patch 2 x 8 x 8 (4 temporal token slots), width 64 / 4 heads,
# decoder width 32 / 4 heads, pred_t_dim 4
BAD_OPTIONS = [
    ("depth", -1), ("depth", 0), ("depth", 2.5), ("depth", "3"), ("depth", True),
    ("embed_dim", 0), ("embed_dim", 66.0),
    ("num_heads", -4), ("num_heads", 5),  # 5 does not divide 64
    ("decoder_depth", 0), ("decoder_depth", 1.5),
    ("decoder_embed_dim", -32), ("decoder_embed_dim", "32"),
    ("decoder_num_heads", 0), ("decoder_num_heads", 3),  # 3 does not divide 32
    ("img_size", 0), ("img_size", 30),  # not a multiple of the 8 px patches
    ("patch_size", -8), ("patch_size", 7),
    ("num_frames", 0), ("num_frames", 7),  # not a multiple of t_patch_size 2
    ("t_patch_size", 0), ("t_patch_size", 3),
    ("in_chans", 0), ("in_chans", 3.0),
    ("pred_t_dim", 0), ("pred_t_dim", 3), ("pred_t_dim", 16),  # 3: not a multiple of 4 slots; 16 > 8 frames
    ("mlp_ratio", 0), ("mlp_ratio", -4.0), ("mlp_ratio", "4"), ("mlp_ratio", float("nan")),
    ("drop_path_rate", 1.0), ("drop_path_rate", -0.1),
]
BAD_CLASSIFIER_OPTIONS = [
    ("num_classes", 0), ("num_classes", 2.0), ("dropout", 1.0), ("dropout", -0.5),
    ("head_init_scale", 0.0), ("head_init_scale", -1),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS + BAD_CLASSIFIER_OPTIONS)
def test_bad_model_options_are_one_clear_error(option, value):
    build = build_classifier if (option, value) in BAD_CLASSIFIER_OPTIONS else build_pretrain_model
    with pytest.raises(ValueError, match=rf"^invalid model options: .*\b{option}=") as err:
        build("vit_tiny", **{option: value})
    assert "must" in str(err.value) or "choose" in str(err.value)  # says what is allowed


def test_all_problems_of_a_config_in_one_message():
    with pytest.raises(ValueError) as err:
        build_pretrain_model("vit_tiny", depth=-1, num_heads=5, pred_t_dim=3)
    assert str(err.value) == (
        "invalid model options: depth=-1 (must be an integer >= 1); "
        "num_heads=5 does not divide embed_dim=64 (choose a divisor of 64); "
        "pred_t_dim=3 must be a multiple of the 4 temporal token slots and at most num_frames=8 (choose one of 4, 8)")
    cfg = resolve_config(MAEConfig, "vit_tiny")
    with pytest.raises(ValueError, match=r"decoder_depth=0 \(must be an integer >= 1\)"):
        dataclasses.replace(cfg, decoder_depth=0)  # changed copies are checked again


def test_valid_edge_options_still_build():
    # smallest allowed values, ints where floats are expected (as `model.mlp_ratio=2` arrives from the command line)
    model = build_pretrain_model("vit_tiny", depth=1, num_heads=1, decoder_depth=1, decoder_num_heads=1, mlp_ratio=2,
                                 drop_path_rate=0, pred_t_dim=8, in_chans=3, t_patch_size=1, num_frames=8)
    assert model.cfg.grid == (8, 4, 4) and len(model.blocks) == 1
    clf = build_classifier("vit_tiny", num_classes=1, dropout=0, head_init_scale=1, drop_path_rate=0.99)
    assert clf(clips(1)).shape == (1, 1)


# --- decoder masking (decoder_keep < 1) --------------------------------------------------------------------------


def test_decoder_keep_one_takes_no_draw_of_its_own():
    """At decoder_keep=1 (mae_st's model) the forward draws its masking noise and nothing else: a run's random
    stream, and with it every loss, stays what it was before decoder masking existed."""
    model = tiny()
    torch.manual_seed(5)
    loss, pred, mask = model(clips(), mask_repeats=2)
    torch.manual_seed(5)
    noise = torch.rand(4, model.cfg.num_patches)
    after = torch.rand(1)
    assert torch.equal(model(clips(), noise=noise, mask_repeats=2)[0], loss)
    torch.manual_seed(5)
    model(clips(), mask_repeats=2)
    assert torch.equal(torch.rand(1), after)


def test_decoding_every_masked_token_through_the_subset_path_is_the_full_decoder():
    """The subset path (visible tokens, then the kept masked ones, each with its position) is the same computation
    as mae_st's decoder when it keeps them all: same loss and predictions, to float rounding."""
    full = tiny()
    every = tiny(decoder_keep=0.999)  # 58 masked tokens: round(57.9) keeps them all, through the subset path
    every.load_state_dict(full.state_dict())
    noise = torch.rand(4, 64)
    loss, pred, mask = full(clips(), noise=noise, mask_repeats=2)
    loss_s, pred_s, mask_s = every(clips(), noise=noise, mask_repeats=2, decoder_noise=torch.rand(4, 64))
    assert torch.equal(mask, mask_s)
    torch.testing.assert_close(loss_s, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred_s, pred, rtol=1e-4, atol=1e-5)


def test_the_loss_counts_exactly_the_kept_masked_tokens():
    """keep 0.5 of 58 masked tokens = 29 per view, those of least decoder noise: the loss is the mean over them of
    each token's squared error against its normalized target, computed here by hand from the returned predictions."""
    model = tiny(decoder_keep=0.5)
    seen = []
    model.decoder_blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    videos, noise, decoder_noise = clips(), torch.rand(4, 64), torch.rand(4, 64)
    loss, pred, mask = model(videos, noise=noise, mask_repeats=2, decoder_noise=decoder_noise)
    visible = int(64 * 0.1)
    assert seen == [(4, 1 + visible + 29, model.cfg.decoder_embed_dim)]  # cls + 6 visible + 29 masked
    targets = model.targets(videos)  # [2, 64, P], every token
    errors = []
    for row in range(4):
        masked = torch.nonzero(mask[row]).flatten()
        kept = masked[decoder_noise[row, masked].argsort()[:29]]  # the 29 masked tokens of least noise
        dropped = masked[decoder_noise[row, masked].argsort()[29:]]
        assert pred[row, dropped].abs().sum() == 0  # not reconstructed: 0 in the returned predictions
        assert pred[row, kept].abs().min(dim=-1).values.gt(0).all()
        errors.append((pred[row, kept] - targets[row // 2, kept]).pow(2).mean(-1))
    torch.testing.assert_close(loss, torch.cat(errors).mean())


def test_decoder_subsets_are_drawn_per_view_and_the_running_cell_takes_turns():
    from models.decoder_subsets import DECODER_SUBSETS

    model = tiny(decoder_keep=0.5)
    torch.manual_seed(0)
    _, pred, mask = model(clips(1), mask_repeats=2, noise=torch.rand(1, 64).repeat(2, 1))  # one mask, twice
    assert torch.equal(mask[0], mask[1])
    assert not torch.equal(pred[0] != 0, pred[1] != 0)  # each view its own subset of the same masked tokens
    turn = DECODER_SUBSETS["running_cell"]((3, 4, 4), torch.zeros(1, 48)).view(3, 2, 2, 2, 2)  # t, h/2, 2, w/2, 2
    for t in range(3):  # in every 2 x 2 cell each position has its own turn, all cells alike, shifted each step
        cells = turn[t].permute(0, 2, 1, 3).reshape(4, 4)
        assert all(sorted(cell.tolist()) == [0, 1, 2, 3] for cell in cells) and (cells == cells[0]).all()
    assert torch.equal(turn[1], (turn[0] - 1) % 4)
    loss, pred, _ = tiny(decoder_keep=0.5, decoder_subset="running_cell")(clips(), mask_repeats=2)
    assert loss.isfinite() and (pred.abs().sum(-1) > 0).sum(1).tolist() == [6 + 29] * 4


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, "half", float("nan"), True])
def test_decoder_keep_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match="decoder_keep"):
        tiny(decoder_keep=value)


def test_decoder_subset_names_its_choices():
    with pytest.raises(ValueError, match="decoder_subset='tube' \\(must be one of random, running_cell\\)"):
        tiny(decoder_subset="tube")


def test_pictures_show_the_tokens_decoder_masking_left_out_gray():
    from trainer.visualize import reconstruction_grid

    model = tiny(decoder_keep=0.5)
    videos = clips(1)
    _, pred, mask = model(videos)
    grid = reconstruction_grid(model, videos, pred, mask, 1, clips=1)  # rows: target, masked input, reconstruction
    gray = torch.isclose(grid, torch.tensor(0.5), atol=1e-5).all(0)  # [3 x 32, 4 frames x 32]
    pixels_per_token = 8 * 8  # one target frame per token
    assert gray[32:64].sum() == 58 * pixels_per_token  # the input: every masked token
    assert gray[64:96].sum() == (58 - 29) * pixels_per_token  # the reconstruction: those not reconstructed
