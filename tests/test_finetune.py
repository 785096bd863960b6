"""trainer/finetune.py: learning plain classes from a tiny pretraining run, layer-wise lr decay, the batch
augmentations, multi-view averaging, and what --pretrained refuses."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_shards, write_video
from models import build_classifier
from tools import build_shards
from trainer import finetune, pretrain
from trainer.batch_augment import mixup_cutmix, random_erasing, smooth_one_hot
from trainer.engine import param_groups
from trainer.evaluate import accuracy_report, collect_video_scores
from trainer.finetune import layer_decay_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}


def colour_shards(root) -> str:
    """4 classes, a solid colour each (with the frame-index blocks): train 4 clips per class, val 4
    (other seeds). What fine-tuning must learn is plain, so a failure is the machinery's, not the task's."""
    out = str(root / "shards")
    for split, seeds in (("train", range(4)), ("val", range(10, 14))):
        for name, colour in COLOURS.items():
            os.makedirs(root / split / name, exist_ok=True)
            for seed in seeds:
                write_video(root / split / name / f"{seed}.mp4", frames=40, seed=seed, texture=colour)
        assert build_shards.main(["--root", str(root / split), "--out", out, "--split", split, "--codec", "vp9",
                                  "--workers", "1"]) == 0
    return out


@pytest.mark.long
def test_finetuning_learns_its_classes_from_a_tiny_pretraining(tmp_path, capsys):
    """16 validation videos of 4 classes: chance is 25%; 75% (12 of 16) is reached by a chance-level classifier with
    probability below 0.1% (binomial). A 30-step pretraining hands over; fine-tuning runs 10 epochs of 16 clips,
    evaluates once at the end, 2 clips x 3 crops per video. The three runs share this process (a process start is
    about 5 s)."""
    shards = colour_shards(tmp_path / "colours")
    common = ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--data", shards]
    pretrained, run_dir = str(tmp_path / "pt"), str(tmp_path / "ft")
    assert pretrain.main(pretrain.Pretraining, [*common, "--recipe", "tiny_PT", "--output", pretrained,
                                                "--max-steps", "30"]) == 0
    capsys.readouterr()
    tune = ["--recipe", "demo_FT", "epochs=10", "warmup_epochs=1", "blr=0.05"]
    assert finetune.main(finetune.Finetuning, [*common, *tune, "--pretrained", pretrained, "--output", run_dir]) == 0
    out = capsys.readouterr().out
    assert "freshly initialized: head.weight, head.bias" in out  # the report of what --pretrained gave
    top1_line = [line for line in out.splitlines() if line.startswith("top1:")]
    assert top1_line and "(16 videos, 2x3 views)" in top1_line[0]
    report = json.load(open(os.path.join(run_dir, "eval.json")))
    assert report["top1"] >= 75, report
    assert report["videos"] == 16 and report["views"] == "2x3"
    assert set(report["per_class"]) == set(COLOURS)
    assert open(os.path.join(run_dir, "per_class_accuracy.csv")).readline().strip() == "class,videos,top1"
    # --eval-only tests the run's own checkpoint again, without a step of training
    assert finetune.main(finetune.Finetuning, [*common, *tune, "--output", run_dir, "--eval-only"]) == 0
    again = capsys.readouterr().out
    assert f"top1: {report['top1']:.2f}" in again


def test_layer_decay_multipliers():
    model = build_classifier("vit_tiny", num_classes=3)  # depth 2
    scale = {name: layer_decay_scale(name, 2, 0.5) for name, _ in model.named_parameters()}
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["blocks.0.mlp.fc1.bias"] == 0.25
    assert scale["patch_embed.proj.weight"] == scale["pos_embed_spatial"] == scale["cls_token"] == 0.125
    groups = param_groups(model, 0.05, lambda n: scale[n])
    by_scale = {(g["lr_scale"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_scale[(0.125, 0.0)] == 1  # the patch embedding's bias: no weight decay
    assert sum(by_scale.values()) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim == 1 for p in g["params"]))


def test_mixup_cutmix_and_random_erasing():
    np.random.seed(0)
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    targets = smooth_one_hot(labels, 4, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets[0, 0] == pytest.approx(0.925)
    video = torch.arange(4.0)[:, None, None, None, None].expand(4, 3, 2, 8, 8).clone()  # clip i is all i
    mixed, soft = mixup_cutmix(video, labels, 4, mixup=0.8, cutmix=0.0, switch_prob=0.5, smoothing=0.0)
    lam = 1 - mixed[0, 0, 0, 0, 0].item() / 3  # clip 0 mixed with clip 3
    assert soft[0, 0] == pytest.approx(lam, abs=1e-5) and soft[0, 3] == pytest.approx(1 - lam, abs=1e-5)
    cut, soft = mixup_cutmix(video, labels, 4, mixup=0.0, cutmix=1.0, switch_prob=0.5, smoothing=0.0)
    pasted = (cut[0] == 3).float()  # where clip 3 was pasted into clip 0
    assert torch.equal(pasted[:, 0], pasted[:, 1])  # the same box in every frame
    assert soft[0, 3] == pytest.approx(pasted.mean().item(), abs=1e-6)
    erased = random_erasing(torch.zeros(6, 3, 4, 16, 16), probability=1.0)
    for clip in erased:
        box = clip != 0
        assert box.any() and torch.equal(box[:, 0], box[:, 3])


def test_multi_view_evaluation_averages_each_videos_own_views():
    """A model whose answer depends on the view: views carry (video, view) in their pixels; for video v the class
    v view scores favour 2 of 3 views, another class 1 view. Only averaging that video's 3 views gets it right."""
    def batches():
        for first in (0, 2):  # two batches of 2 videos x 3 views, clip-major
            index = torch.tensor([first, first, first, first + 1, first + 1, first + 1])
            view = torch.tensor([0, 1, 2, 0, 1, 2])
            video = (index * 10 + view).float()[:, None, None, None, None].expand(6, 3, 1, 2, 2)
            yield {"video": video, "label": index % 4, "video_index": index}

    def model(video):
        code = video[:, 0, 0, 0, 0].long()
        index, view = code // 10, code % 10
        logits = torch.full((len(code), 4), -5.0)
        right = (view != 2)
        logits[right, index[right] % 4] = 2.0  # two views vote for the right class...
        logits[~right, (index[~right] + 1) % 4] = 5.0  # ... and one, more confidently, for another
        return logits

    labels, scores = collect_video_scores(model, batches())
    assert labels.tolist() == [0, 1, 2, 3]
    report = accuracy_report(labels, scores, {0: "a", 1: "b", 2: "c", 3: "d"})
    assert report["top1"] == 100.0 and report["per_class"]["c"] == {"videos": 1, "top1": 100.0}
    single = model(next(batches())["video"])[2::3].softmax(-1)  # the third view alone is wrong
    assert single.argmax(-1).tolist() == [1, 2]


def test_pretrained_refuses_what_it_cannot_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bad = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, bad)
    shards = make_shards(tmp_path, n=4, frames=40)
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "demo_FT", "--data", shards,
            "--output", str(tmp_path / "run"), "--pretrained", str(bad), "eval_split=train"]
    assert finetune.main(finetune.Finetuning, args) == 2
    assert "not an MAE-ST video ViT checkpoint" in capsys.readouterr().err
    # --eval-only with nothing to test (a typo in --output) tested a random model and printed its top-1
    fresh = [*args[:args.index("--pretrained")], "--output", str(tmp_path / "typo"), "--eval-only", "eval_split=train"]
    assert finetune.main(finetune.Finetuning, fresh) == 2
    assert "--eval-only: nothing to test" in capsys.readouterr().err and not os.path.exists(tmp_path / "typo")
    with pytest.raises(SystemExit):  # its --help offers no mixture, which fine-tuning refuses
        finetune.main(finetune.Finetuning, ["--help"])
    assert "mixture" not in capsys.readouterr().out
