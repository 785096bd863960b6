"""tools/soak.py's verdict: a warm-up that fills pools passes, a steady leak and a leaked descriptor fail."""

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
