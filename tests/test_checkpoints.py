"""Official-checkpoint interop against the key/shape manifests of every released variant.

The manifests (tests/data/checkpoint_keys/, see tests/data/README.md) list the state_dict keys and shapes of the
models the official code builds: facebookresearch/mae_st's factories and facebookresearch/SlowFast's
configs/masked_ssl configs, each file naming its repository, commit and factory or config.

ViT-B manifests are loaded with real random weights and every value is checked to land where the official names
say; ViT-L/H manifests (1.2-2.6 GB each in fp32) are checked on the meta device, which tests names and shapes
without allocating them.
"""

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

from models import build_classifier, build_pretrain_model, checkpoint_layout, load_pretrained
from trainer.checkpointing import write_checkpoint
from models.checkpoints import CheckpointMismatchError, from_ours, read_state_dict, to_ours
from models.config import SLOWFAST_LAYOUT

MANIFESTS = pathlib.Path(__file__).resolve().parent / "data" / "checkpoint_keys"
# every released variant, listed rather than globbed: a missing manifest fails its test instead of vanishing
ALL = [f"{release}_{kind}_vit_{size}" for release, kinds in (("mae_st", ("pretrain", "finetune")),
                                                             ("slowfast", ("pt", "ft")))
       for kind in kinds for size in "blh"]


def in_format(model, fmt: str) -> dict:
    """A model's weights as a file of `fmt` holds them."""
    return from_ours(model.state_dict(), fmt)


def manifest(name):
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def official_overrides(info) -> dict:
    """Our constructor arguments for a manifest, read from the official code's own arguments / config values."""
    if info["codebase"].endswith("mae_st"):
        preset, kwargs = info["factory_preset_kwargs"], info["constructor_kwargs_consumed"]
        out = dict(patch_size=int(preset["patch_size"]), embed_dim=int(preset["embed_dim"]), depth=int(preset["depth"]),
                   num_heads=int(preset["num_heads"]), t_patch_size=kwargs["t_patch_size"],
                   num_frames=kwargs["num_frames"])
        if info["kind"] == "pretrain":
            out.update({k: kwargs[k] for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                                               "pred_t_dim", "norm_pix_loss")})
        return out
    cfg = info["cfg_values"]
    out = dict(patch_size=cfg["MVIT.PATCH_KERNEL"][1], t_patch_size=cfg["MVIT.PATCH_KERNEL"][0],
               embed_dim=cfg["MVIT.EMBED_DIM"], depth=cfg["MVIT.DEPTH"], num_heads=cfg["MVIT.NUM_HEADS"],
               num_frames=cfg["DATA.NUM_FRAMES"], img_size=cfg["DATA.TRAIN_CROP_SIZE"])
    if cfg["MASK.ENABLE"]:
        out.update(decoder_embed_dim=cfg["MASK.DECODER_EMBED_DIM"], decoder_depth=cfg["MASK.DECODER_DEPTH"])
    return out


def manifest_state(info, device):
    gen = torch.Generator().manual_seed(0)
    if device == "meta":
        return {key: torch.empty(shape, device="meta") for key, shape in info["state_dict"]}
    return {key: torch.randn(shape, generator=gen) for key, shape in info["state_dict"]}


@pytest.mark.parametrize("name", ALL)
def test_every_official_manifest_loads(name):
    info = manifest(name)
    is_pretrain = "_pt_" in name or "pretrain" in name
    device = "cpu" if name.endswith("_b") else "meta"
    state = manifest_state(info, device)
    checkpoint = {"model_state" if "slowfast" in name else "model": state}
    with torch.device(device):
        if is_pretrain:  # the model is built in the file's decoder layout, read from the file
            layout = checkpoint_layout(checkpoint)
            assert layout["decoder_pos_embed"] == ("joint" if "slowfast" in name else "separable")
            model = build_pretrain_model("vit_b", **official_overrides(info), **layout)
        else:
            model = build_classifier("vit_b", **official_overrides(info))
    report = load_pretrained(model, checkpoint)
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]  # the file's exact layout
    assert report.source_format == ("slowfast" if "slowfast" in name else "mae_st")
    assert report.fresh == [] and report.ignored == []
    if is_pretrain:  # decoder heads are not in the file: mae_st's command line says 16, SlowFast's code 512 / 64
        assert model.decoder_blocks[0].attn.num_heads == (8 if "slowfast" in name else 16)
    if device == "cpu":
        ours = model.state_dict()
        for key, value in from_ours(ours, report.source_format).items():
            assert torch.equal(value, state[key]), key


def test_mae_st_qkv_fusion_matches_separate_qkv_attention():
    """Anchor to mae_st semantics, not to our own export: a block written with separate q, k, v linears."""
    torch.manual_seed(0)
    official = from_ours(build_pretrain_model("vit_tiny").state_dict(), "mae_st")
    model = build_pretrain_model("vit_tiny").eval()
    load_pretrained(model, {"model": official})
    x = torch.randn(2, 5, 64)

    def w(name):
        return official[f"blocks.0.{name}"]

    heads = model.cfg.num_heads
    h = F.layer_norm(x, (64,), w("norm1.weight"), w("norm1.bias"), 1e-6)
    q, k, v = (F.linear(h, w(f"attn.{n}.weight"), w(f"attn.{n}.bias")).view(2, 5, heads, 16).transpose(1, 2)
               for n in "qkv")
    attn = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1) @ v
    x1 = x + F.linear(attn.transpose(1, 2).reshape(2, 5, 64), w("attn.proj.weight"), w("attn.proj.bias"))
    h = F.layer_norm(x1, (64,), w("norm2.weight"), w("norm2.bias"), 1e-6)
    mlp = F.linear(F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"), w("mlp.fc2.bias"))
    torch.testing.assert_close(model.blocks[0](x), x1 + mlp)


def test_slowfast_names_land_in_the_right_modules():
    torch.manual_seed(0)
    ours = build_pretrain_model("vit_tiny", **SLOWFAST_LAYOUT).state_dict()
    official = from_ours(ours, "slowfast")
    depth = 1  # vit_tiny's decoder depth: the decoder norm sits right after the blocks
    assert torch.equal(official[f"pred_head.transforms.0.{depth}.weight"], ours["decoder_norm.weight"])
    assert torch.equal(official["pred_head.projections.0.weight"], ours["decoder_pred.weight"])
    assert torch.equal(official["pred_head.transforms.0.0.attn.qkv.weight"], ours["decoder_blocks.0.attn.qkv.weight"])
    assert "decoder_pos_embed" in official and "decoder_cls_token" not in official
    clf = from_ours(build_classifier("vit_tiny").state_dict(), "slowfast")
    assert "head.projection.weight" in clf and "head.weight" not in clf


def test_slowfast_decoder_cls_is_the_projected_encoder_cls():
    torch.manual_seed(0)
    model = build_pretrain_model("vit_tiny", **SLOWFAST_LAYOUT).eval()
    latent, _, ids_restore = model.forward_encoder(torch.randn(1, 3, 8, 32, 32), 0.9, torch.rand(1, 64), 1)
    seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 0]))
    model.forward_decoder(latent, ids_restore)
    expected = model.decoder_embed(latent[:, 0]) + model.decoder_pos_embed[:, 0]
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("fmt,layout", [("mae_st", {}), ("slowfast", SLOWFAST_LAYOUT), ("ours", {})])
def test_round_trip_through_a_file_gives_identical_outputs(tmp_path, fmt, layout):
    torch.manual_seed(0)
    model = build_pretrain_model("vit_tiny", **layout).eval()
    path = tmp_path / "ckpt.pth"
    write_checkpoint(in_format(model, fmt), str(path), fmt, epoch=3)
    assert list(torch.load(path, weights_only=True))[0] == {"slowfast": "model_state"}.get(fmt, "model")
    torch.manual_seed(1)
    if layout:  # a model of the other layout is refused, with how to build the right one
        with pytest.raises(CheckpointMismatchError, match=r"build the model with it.*decoder_pos_embed='joint'"):
            load_pretrained(build_pretrain_model("vit_tiny"), str(path))
    fresh = build_pretrain_model("vit_tiny", **checkpoint_layout(str(path))).eval()
    report = load_pretrained(fresh, str(path))
    assert report.source_format == fmt
    x, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, 64)
    for a, b in zip(model(x, noise=noise), fresh(x, noise=noise)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_classifier_takes_the_pretrained_encoder_and_a_fresh_head():
    torch.manual_seed(0)
    mae = build_pretrain_model("vit_tiny")
    clf = build_classifier("vit_tiny", num_classes=5)
    head_before = clf.head.weight.clone()
    report = load_pretrained(clf, {"model": in_format(mae, "mae_st")})
    assert report.fresh == ["head.weight", "head.bias"]
    assert "decoder_pred.weight" in report.ignored and "mask_token" in report.ignored
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert torch.equal(clf.pos_embed_temporal, mae.pos_embed_temporal)
    assert torch.equal(clf.head.weight, head_before)
    assert "freshly initialized: head.weight, head.bias" in str(report)
    # a fine-tuned file with a head of the right size keeps it
    other = build_classifier("vit_tiny", num_classes=5)
    assert load_pretrained(other, {"model_state": in_format(clf, "slowfast")}).fresh == []
    assert torch.equal(other.head.weight, clf.head.weight)


def test_mismatches_are_errors_that_name_the_keys():
    torch.manual_seed(0)
    state = in_format(build_pretrain_model("vit_tiny"), "mae_st")
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed.proj.weight: checkpoint \[64, 3, 2, 8, 8\]"):
        load_pretrained(build_pretrain_model("vit_tiny", patch_size=4), {"model": state})
    with pytest.raises(CheckpointMismatchError, match="build the model with these overrides"):
        load_pretrained(build_pretrain_model("vit_tiny", patch_size=4), {"model": state})
    del state["blocks.1.mlp.fc1.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(1\): blocks.1.mlp.fc1.bias"):
        load_pretrained(build_pretrain_model("vit_tiny"), {"model": state})
    finetuned = in_format(build_classifier("vit_tiny"), "mae_st")
    with pytest.raises(CheckpointMismatchError, match="no MAE decoder"):
        load_pretrained(build_pretrain_model("vit_tiny"), finetuned)
    with pytest.raises(ValueError, match="not an MAE-ST video ViT checkpoint"):
        load_pretrained(build_pretrain_model("vit_tiny"), {"model": {"conv1.weight": torch.zeros(1)}})


def test_mae_st_vit_h_patch14_error_tells_how_to_build_it():
    info = manifest("mae_st_pretrain_vit_h")
    with torch.device("meta"):
        model = build_pretrain_model("vit_h")
    with pytest.raises(CheckpointMismatchError, match="patch_size=14"):
        load_pretrained(model, manifest_state(info, "meta"))


def test_read_state_dict_unwraps_and_strips_prefixes(tmp_path):
    state = {"module.patch_embed.proj.weight": torch.zeros(2, 3, 2, 4, 4),
             "module.blocks.0.attn.q.weight": torch.zeros(2, 2)}
    path = tmp_path / "x.pth"
    torch.save({"model": state, "epoch": 1, "args": __import__("argparse").Namespace(lr=1.0)}, path)
    loaded, fmt = read_state_dict(str(path))
    assert fmt == "mae_st" and sorted(loaded) == ["blocks.0.attn.q.weight", "patch_embed.proj.weight"]
    assert to_ours(loaded, "ours") == loaded
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint this project reads: it holds more than tensors"):
        read_state_dict(str(tmp_path / "bad.pth"))


def test_converter_cli(tmp_path, capsys):
    from tools.convert_checkpoint import main

    torch.manual_seed(0)
    model = build_pretrain_model("vit_tiny", **SLOWFAST_LAYOUT)
    write_checkpoint(in_format(model, "slowfast"), str(tmp_path / "sf.pyth"), "slowfast")
    assert main([str(tmp_path / "sf.pyth"), str(tmp_path / "enc.pth"), "--to", "mae_st", "--encoder-only"]) == 0
    assert "slowfast format" in capsys.readouterr().out
    encoder, fmt = read_state_dict(str(tmp_path / "enc.pth"))
    assert fmt == "mae_st" and not any(k.startswith("decoder_") for k in encoder)
    clf = build_classifier("vit_tiny", num_classes=3)
    load_pretrained(clf, str(tmp_path / "enc.pth"))
    assert torch.equal(clf.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # a SlowFast-layout decoder has no place in the mae_st format: refused, with the ways out
    assert main([str(tmp_path / "sf.pyth"), str(tmp_path / "x.pth"), "--to", "mae_st"]) == 2
    assert "converts whole only to its own layout's format (slowfast, or ours)" in capsys.readouterr().err
    # nor an mae_st-layout one (this project's pretraining runs) in SlowFast's: its encoder converts
    write_checkpoint(in_format(build_pretrain_model("vit_tiny"), "mae_st"), str(tmp_path / "ours.pth"),
                     "mae_st")
    assert main([str(tmp_path / "ours.pth"), str(tmp_path / "x.pyth"), "--to", "slowfast"]) == 2
    assert "--encoder-only" in capsys.readouterr().err
    assert main([str(tmp_path / "ours.pth"), str(tmp_path / "x.pyth"), "--to", "slowfast", "--encoder-only"]) == 0
    capsys.readouterr()
    # a SlowFast encoder (no decoder, no head) is told by its file's 'model_state', not taken for this project's
    assert read_state_dict(str(tmp_path / "x.pyth"))[1] == "slowfast"
    assert "loaded" in str(load_pretrained(clf, str(tmp_path / "x.pyth"))) and "a SlowFast checkpoint" in str(
        load_pretrained(clf, str(tmp_path / "x.pyth")))
    assert main([str(tmp_path / "x.pyth"), str(tmp_path / "y.pth"), "--to", "mae_st"]) == 0
    assert f"{tmp_path / 'x.pyth'}: slowfast format" in capsys.readouterr().out
    # a file that is not a checkpoint: what it is, not torch's advice to load it unsafely
    (tmp_path / "notes.pth").write_bytes(b"\x80\x04\x95" + b"not a checkpoint" * 4)
    with pytest.raises(ValueError) as err:
        read_state_dict(str(tmp_path / "notes.pth"))
    assert "is not a checkpoint this project reads" in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("name", ["mae_st_pretrain_vit_b", "slowfast_pt_vit_b"])
def test_official_pretraining_files_give_the_classifier_their_encoder(name):
    """What fine-tuning from the seed's model-zoo files does: encoder loaded, decoder ignored, head fresh."""
    info = manifest(name)
    options = {k: v for k, v in official_overrides(info).items() if not k.startswith(("decoder", "pred_t", "norm_pix"))}
    model = build_classifier("vit_b", num_classes=400, **options)
    state = manifest_state(info, "cpu")
    report = load_pretrained(model, {"model_state" if "slowfast" in name else "model": state})
    assert report.fresh == ["head.weight", "head.bias"]
    converted = to_ours(state, report.source_format)
    assert sorted(report.ignored) == sorted(k for k in converted if k.startswith(("decoder", "mask_token")))
    qkv = torch.cat([state[f"blocks.3.attn.{n}.weight"] for n in "qkv"]) if "mae_st" in name \
        else state["blocks.3.attn.qkv.weight"]
    assert torch.equal(model.blocks[3].attn.qkv.weight, qkv)


def test_manifests_are_all_here_and_name_their_source():
    assert sorted(p.stem for p in MANIFESTS.glob("*.json")) == sorted(ALL)
    commits = {"facebookresearch/mae_st": "c5dec1bc01062097906ea67fe47935ec33fd46df",
               "facebookresearch/SlowFast": "287ec0076846560f44a9327e931a5a2360240533"}
    for name in ALL:
        info = manifest(name)
        assert info["commit"] == commits[info["codebase"]], name
        assert info["kind"] == ("pretrain" if "_pt_" in name or "pretrain" in name else "finetune"), name
        source = info["factory"] if "mae_st" in name else info["config"]
        assert source.endswith(("patch16", "patch14", "_PT.yaml", "_FT.yaml")), (name, source)
        assert len({key for key, _ in info["state_dict"]}) == len(info["state_dict"]), name
