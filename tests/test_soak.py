"""tools/soak.py's verdict: a warm-up that fills pools passes, a steady leak and a leaked descriptor fail."""

import os

from tools.soak import RSS_GROWTH_LIMIT, loader_growth


def epochs(rss, fds=None):
    return [{"rss_mb": r, "fds": (fds or [6] * len(rss))[i]} for i, r in enumerate(rss)]


def test_a_warm_up_over_the_first_epochs_passes_and_a_leak_fails():
    # pools filling over the first quarter (the repair's side pipeline runs once an epoch), then flat with noise
    warm_then_flat = [400 + 5 * e for e in range(25)] + [510 + (e % 5) * 5 for e in range(75)]
    rss, fds = loader_growth(epochs(warm_then_flat))
    assert rss < RSS_GROWTH_LIMIT and fds == 0
    leak = [420 + 0.5 * e for e in range(100)]  # half a MB an epoch, for good
    assert loader_growth(epochs(leak))[0] > RSS_GROWTH_LIMIT
    descriptor_leak = [6 + e // 10 for e in range(100)]
    assert loader_growth(epochs([500] * 100, descriptor_leak))[1] > 0


def test_the_soak_builds_the_demo_shards_it_needs_before_it_starts(tmp_path, monkeypatch):
    """From a fresh clone `python tools/soak.py` failed after its loader part: demo_data/shards was missing."""
    from tools import make_demo_data, soak

    order = []

    def build(argv):
        order.append("build")
        os.makedirs(os.path.join(argv[argv.index("--out") + 1], "shards"))
        open(os.path.join(argv[argv.index("--out") + 1], "shards", "manifest.json"), "w").close()
        return 0

    monkeypatch.setattr(make_demo_data, "main", build)
    monkeypatch.setattr(soak, "soak_shards", lambda folder: order.append("loader shards") or folder)
    monkeypatch.setattr(soak, "soak_loader", lambda *args: order.append("loader") or epochs([400] * 8))
    monkeypatch.setattr(soak, "soak_training", lambda *args: order.append("training") or epochs([400] * 8))
    assert soak.main(["--out", str(tmp_path / "soak"), "--demo-shards", str(tmp_path / "demo" / "shards")]) == 0
    assert order == ["build", "loader shards", "loader", "training"]
