"""Option checks in one style: a table {option: (test, what it may be)} per config, and every problem of a config
in one message. The loader's configs use it and so do the trainer's recipe sections and the ds_config. The model's
options (models/config.py) follow the same rules (an integer is any Integral but a bool; a number is finite and not
a bool) with checks of their own, since models import nothing from dali_pipes (the README's layers)."""

import math
import numbers


def integer(low: int | None = None):
    """An integer (an int or a numpy integer; not a bool, not 2.0), at least `low`: models/config.py's rule too."""
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and (low is None or v >= low)


def number(low: float | None = None, high: float | None = None, above: float | None = None,
           below: float | None = None):
    """A finite real number (not a bool) within [low, high] and (above, below)."""
    def test(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            return False
        return all((low is None or v >= low, high is None or v <= high, above is None or v > above,
                    below is None or v < below))
    return test


def optional(test):
    return lambda v: v is None or test(v)


def boolean(v) -> bool:
    return type(v) is bool


def pair(item_test):
    """Two values, each passing item_test, the first no larger than the second."""
    return lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(item_test, v)) and v[0] <= v[1]


def problems(config, rules: dict) -> list[str]:
    """One phrase per option of `config` that fails its rule, naming it and what it may be."""
    return [f"{name}={getattr(config, name)!r} (must be {allowed})" for name, (test, allowed) in rules.items()
            if not test(getattr(config, name))]


def refuse(what: str, found: list[str]) -> None:
    """Raise one ValueError listing every problem, if there is any."""
    if found:
        raise ValueError(f"invalid {what}: " + "; ".join(found))
