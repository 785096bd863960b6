"""Frame and crop choices of the pipelines (dali_pipes/sampling.py), checked number by number."""

import numpy as np
import pytest

from dali_pipes.sampling import (ViewSpec, clip_indices, clip_span, eval_boxes, plan_eval_sample, plan_train_sample,
                                 random_resized_box, random_start)


def test_clip_indices_stride_target_fps_and_edge_padding():
    assert clip_indices(2, 16, 4, 30, None, 300).tolist() == list(range(2, 63, 4))
    # a 60 fps video sampled at 30 fps: stride 4 at 30 fps is 8 source frames
    assert clip_indices(0, 4, 4, 60, 30, 300).tolist() == [0, 8, 16, 24]
    # 25 fps at a 30 fps target: 4 x 25/30 = 3.33 frames per step, floored
    assert clip_indices(0, 4, 4, 25, 30, 300).tolist() == [0, 3, 6, 10]
    # shorter than the clip: the last frame repeats
    assert clip_indices(0, 6, 4, 30, None, 10).tolist() == [0, 4, 8, 9, 9, 9]
    assert clip_span(16, 4, 30, None) == 61


def test_random_start_covers_both_ends_evenly():
    rng = np.random.default_rng(0)
    starts = np.array([random_start(70, 61, rng) for _ in range(20000)])  # 10 possible starts: 0..9
    assert starts.min() == 0 and starts.max() == 9
    counts = np.bincount(starts.astype(int))
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000  # the ends as likely as the middle
    assert random_start(40, 61, rng) == 0  # shorter than the clip


def test_random_resized_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        y0, x0, y1, x1 = random_resized_box(240, 320, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        h, w = (y1 - y0) * 240, (x1 - x0) * 320
        assert 0.5 * 240 * 320 * 0.97 <= h * w <= 240 * 320 * 1.01
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # when no sample fits (a very wide frame) it falls back to a centred crop within the ratio bounds
    y0, x0, y1, x1 = random_resized_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert (y0, y1) == (0, 1) and x0 == pytest.approx(1 - x1, abs=2e-3) and (x1 - x0) * 1000 == pytest.approx(13, abs=1)


def test_train_plan_shares_frames_or_gives_each_view_its_own():
    rng = np.random.default_rng(0)
    spec = ViewSpec(num_frames=4, stride=2, repeats=3, crop_size=32)
    plan = plan_train_sample(100, 30, 48, 64, spec, rng)
    assert len(plan.frames) == 4 and all(np.array_equal(o, np.arange(4)) for o in plan.orders)
    assert len({tuple(b) for b in plan.boxes}) == 3  # each view its own crop
    spec = ViewSpec(num_frames=4, stride=2, repeats=3, crop_size=32, per_view_start=True)
    plan = plan_train_sample(100, 30, 48, 64, spec, np.random.default_rng(2))
    clips = [plan.frames[o] for o in plan.orders]
    assert all(np.all(np.diff(c) == 2) for c in clips) and len({c[0] for c in clips}) > 1
    assert plan.frames.tolist() == sorted(set(np.concatenate(clips).tolist()))  # the union, decoded once


def test_eval_views_positions():
    boxes = eval_boxes(48, 144)  # landscape: left, centre, right squares of the short side
    np.testing.assert_allclose(boxes, [[0, 0, 1, 1 / 3], [0, 1 / 3, 1, 2 / 3], [0, 2 / 3, 1, 1]], rtol=1e-6)
    portrait = eval_boxes(144, 48)
    assert [b[0] for b in portrait] == pytest.approx([0, 1 / 3, 2 / 3])
    spec = ViewSpec(num_frames=4, stride=4, repeats=1)
    plan = plan_eval_sample(100, 30, 48, 144, spec, num_clips=3)
    starts = [int(plan.frames[plan.orders[3 * k]][0]) for k in range(3)]
    assert starts == [0, 43, 87]  # first to last possible start (100 - 13 = 87), evenly
    assert len(plan.boxes) == 9 and plan.flips == [0] * 9
    np.testing.assert_array_equal(plan.boxes[:3], boxes)  # clip-major, then the crops
