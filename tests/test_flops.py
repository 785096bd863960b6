"""The analytic compute counts reproduce the paper's figures (multiply-adds per clip / view, within 3%)."""

import pytest

from models import classifier_macs, pretrain_macs
from models.config import ClassifierConfig, MAEConfig, resolve_config


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

