"""The analytic compute counts reproduce the paper's figures (multiply-adds per clip / view, within 3%), and count
decoder masking."""

import pytest

from models import classifier_macs, pretrain_macs
from models.config import ClassifierConfig, MAEConfig, resolve_config
from models.flops import block_macs
from models.memory import activation_bytes


def within(value, paper_g, tolerance=0.03):
    return abs(value / 1e9 - paper_g) / paper_g <= tolerance


def test_vit_l_pretraining_sparse_and_dense_match_paper_table_1():
    cfg = resolve_config(MAEConfig, "vit_l")
    assert within(pretrain_macs(cfg, mask_ratio=0.9), 81.0)
    assert within(pretrain_macs(cfg, dense_encoder=True), 627.5)


@pytest.mark.parametrize("name,paper_g", [("vit_b", 180), ("vit_l", 598), ("vit_h", 1193)])
def test_finetune_per_view_matches_the_model_zoo(name, paper_g):
    assert within(classifier_macs(resolve_config(ClassifierConfig, name)), paper_g)


def test_mask_repeats_share_the_patch_embedding():
    cfg = resolve_config(MAEConfig, "vit_b")
    one, four = pretrain_macs(cfg), pretrain_macs(cfg, mask_repeats=4)
    embed = 1568 * (3 * 2 * 16 * 16) * 768
    assert four - embed == 4 * (one - embed)



def test_decoder_masking_counts_only_the_tokens_the_decoder_runs_on():
    """ViT-L, 90% masking: the decoder on 156 visible + 706 of the 1412 masked tokens at keep 0.5 (not all 1568):
    at least 18% fewer multiply-adds per clip; the activations the decoder and the loss keep shrink with their
    tokens (about 22% less memory in all), the encoder's stay."""
    full, half = (resolve_config(MAEConfig, "vit_l", decoder_keep=k) for k in (1.0, 0.5))
    assert half.decoded_masked(0.9) == 706 and full.decoded_masked(0.9) == 1412
    assert pretrain_macs(half) <= 0.82 * pretrain_macs(full)
    dim, depth = full.decoder_embed_dim, full.decoder_depth
    saved = pretrain_macs(full) - pretrain_macs(half)  # by hand: the decoder blocks and decoder_pred on 706 tokens
    by_hand = depth * (block_macs(dim, 1 + 1568, 4.0) - block_macs(dim, 1 + 862, 4.0)) \
        + 706 * dim * 768  # P = 16 x 16 x 3
    assert saved == by_hand
    assert activation_bytes(half, 2, 4) < 0.8 * activation_bytes(full, 2, 4)
