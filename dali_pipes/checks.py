"""Option checks in one style: a table {option: (test, what it may be)} per config, and every problem of a config
in one message. The loader's configs use it and so do the trainer's recipe sections (models/config.py checks the
model's options the same way, with rules of its own: models import nothing from here)."""

import math
import numbers


def integer(low: int | None = None):
    """An int (not a bool, not 2.0), at least `low`."""
    return lambda v: type(v) is int and (low is None or v >= low)


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


def one_of(*choices):
    return lambda v: v in choices


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
