"""Weighted mixtures of shard sets: the `--data` spec that names them, and the schedule that says which set each
batch of each rank comes from.

    --data demo_data/shards                                       one set (named "data"), as always
    --data "k400=shards/k400:0.6,ssv2=shards/ssv2:0.3:sampling=segments:flip=False,own=s3://bucket/own:0.1"

Sets are split on ','; each is NAME=LOCATION, then ':'-separated fields: a weight (a number > 0) and key=value
options. A LOCATION may hold ':' only in a URL's scheme ('s3://', 'https://'). Weights left out of the spec come from
the recipe (loading.mixture={"k400": 0.6, ...}); they are normalized to sum to 1. Per set, only what changes a clip's
PLAN may differ (PLAN_FIELDS): what changes the DALI graph (frames, crop size, repeats) is the recipe's, the same for
every batch.

The schedule also draws the batches: Schedule.feeds takes the next Feed from the reading thread (feeder.py) of the
set it names, on the loader's way from the readers to the views pipelines.

Why whole batches: DALI's readers have no weighted sampling, and a batch is one pass of one set's pipelines, so each
set keeps its own reader (and its exact resume) and the mixture is only the choice of the next batch's reader.
"""

import ast
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from dali_pipes import checks
from dali_pipes.cursor import StreamCursor
from dali_pipes.sampling import ViewSpec

PLAN_FIELDS = ("sampling", "stride", "target_fps", "flip")  # ViewSpec fields a set may change
SINGLE = "data"  # the name of a --data that is one location
_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$", re.S)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
GOLDEN = (math.sqrt(5) - 1) / 2  # the golden ratio's fractional part: the most evenly spreading rotation


@dataclass(frozen=True)
class ShardSource:
    """One set of a mixture."""

    name: str
    location: str  # a shards folder (or URL) as open_shard_set takes it
    weight: float  # its share of the batches, normalized over the mixture
    plan: dict = field(default_factory=dict)  # {PLAN_FIELDS name: value}: this set's changes to the recipe's views

    def views(self, spec: ViewSpec) -> ViewSpec:
        """The recipe's views with this set's plan options."""
        return dataclasses.replace(spec, **self.plan)


def parse_data(text: str, weights: dict | None = None) -> tuple[ShardSource, ...]:
    """The sets of a --data spec, with `weights` ({name: weight}, the recipe's loading.mixture) for those the spec
    gives none; every problem of the spec in one ValueError."""
    problems = []
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) == 1 and not _NAMED.match(parts[0]):  # one location, as always (a single set, whole weight)
        if weights:
            problems.append(f"loading.mixture names {sorted(weights)} but --data {text!r} is one unnamed location: "
                            "name the sets, NAME=LOCATION,...")
        if not parts[0]:
            problems.append("--data is empty")
        scheme = _SCHEME.match(parts[0])
        head = scheme.group(0) if scheme else ""
        weighted = re.fullmatch(r"(.+):([^:]+)", parts[0][len(head):])
        if weighted and checks.number(above=0)(_literal(weighted[2])) and not os.path.exists(parts[0]):
            problems.append(f"{parts[0]!r}: a weight belongs to a named set of a mixture, NAME=LOCATION:WEIGHT "
                            f"(e.g. data={parts[0]},other=...:0.5); one set takes no weight: --data {head}{weighted[1]}")
        checks.refuse("--data", problems)
        return (ShardSource(SINGLE, parts[0], 1.0),)
    parsed = [_parse_set(part, problems) for part in parts]
    names = [named.group(1) for part in parts if (named := _NAMED.match(part))]
    problems += [f"set {name!r} is named {names.count(name)} times" for name in sorted(set(names))
                 if names.count(name) > 1]
    problems += [f"loading.mixture names {name!r}, which --data does not" for name in sorted(set(weights or {}) -
                                                                                            set(names))]
    final = []
    for name, location, weight, plan in filter(None, parsed):
        weight = weight if weight is not None else (weights or {}).get(name)
        if weight is None:
            problems.append(f"set {name!r} has no weight (NAME=LOCATION:WEIGHT, or loading.mixture)")
        elif not checks.number(above=0)(weight):
            problems.append(f"set {name!r}: weight {weight!r} (must be a number > 0)")
        else:
            final.append(ShardSource(name, location, float(weight), plan))
    checks.refuse("--data", problems)
    total = sum(s.weight for s in final)
    return tuple(ShardSource(s.name, s.location, s.weight / total, s.plan) for s in final)


def _parse_set(part: str, problems: list) -> tuple | None:
    """(name, location, weight or None, plan options) of NAME=LOCATION[:WEIGHT][:key=value...], or None with the
    problems appended."""
    named = _NAMED.match(part)
    if not named:
        problems.append(f"{part!r} is not NAME=LOCATION[:WEIGHT][:key=value...]")
        return None
    name, rest = named.groups()
    scheme = _SCHEME.match(rest)
    head = scheme.group(0) if scheme else ""
    location, *fields = rest[len(head):].split(":")
    location, weight, plan, found = head + location, None, {}, len(problems)
    if not location or location == head:
        problems.append(f"set {name!r} has no location")
    for item in fields:
        key, eq, value = item.partition("=")
        if not eq:
            parsed = _literal(item)
            if weight is not None:
                problems.append(f"set {name!r}: a second weight {item!r}")
            elif not checks.number(above=0)(parsed):
                problems.append(f"set {name!r}: weight {item!r} (must be a number > 0; options are key=value)")
            else:
                weight = parsed
        elif key not in PLAN_FIELDS:
            problems.append(f"set {name!r}: option {key!r} cannot differ per set (only {', '.join(PLAN_FIELDS)}: "
                            "the rest changes the DALI graph and is the recipe's)")
        else:
            plan[key] = value if key == "sampling" else _literal(value)
            try:
                ViewSpec(**{key: plan[key]})
            except ValueError as err:
                problems.append(f"set {name!r}: {str(err).removeprefix('invalid view options: ')}")
    return None if len(problems) > found else (name, location, weight, plan)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def required_single(sources: tuple, what: str) -> ShardSource:
    """The one set of `sources`, or a ValueError: `what` needs one label space (a mixture's labels are per set)."""
    if len(sources) != 1:
        raise ValueError(f"{what} needs one label space, and a mixture's labels are per set: give --data one set "
                         f"(it names {', '.join(s.name for s in sources)})")
    return sources[0]


@dataclass(frozen=True)
class Schedule:
    """Which set batch `b` of rank `r` comes from: the golden-ratio sequence u_n = frac(offset + n * GOLDEN) at
    n = b * world_size + r (the global batch number), mapped through the sets' cumulative weights. Consecutive
    points of it are spread evenly over [0, 1), so every window of batches holds each set's share up to a few
    batches, the ranks of one step draw different sets, and the choice depends on nothing but (seed, rank, b)."""

    weights: tuple  # float per set, summing to 1
    seed: int
    world_size: int

    def set_of(self, rank, batch):
        """The set index (an int, or an int64 array like rank/batch) of batch `batch` of rank `rank`."""
        offset = np.random.default_rng([self.seed, 0x6D6978]).random()  # the seed's own phase of the sequence
        n = np.asarray(batch, dtype=np.float64) * self.world_size + np.asarray(rank, dtype=np.float64)
        u = (offset + n * GOLDEN) % 1.0
        found = np.searchsorted(np.cumsum(self.weights)[:-1], u, side="right")
        return int(found) if np.ndim(found) == 0 else found

    def feeds(self, feeders: list, rank: int, epoch_length: int, stream: StreamCursor):
        """The Feeds of the sets' reading threads (`feeders`, one per set) in this schedule's order for `rank` from
        `stream` on, each carrying the StreamCursor after it; an epoch is `epoch_length` batches."""
        while True:
            index = self.set_of(rank, stream.epoch * epoch_length + stream.position)
            feed = next(feeders[index])
            stream = stream.after(index, feed.cursor, epoch_length)
            yield dataclasses.replace(feed, cursor=stream)
