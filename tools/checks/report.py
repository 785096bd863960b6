"""What a preflight check returns, how a failing one still reports, and how the ranks' reports become one."""

import json
import re
from dataclasses import asdict, dataclass, field

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
NO_GPU = "skipped (no GPU)"
ORDER = {FAIL: 3, WARN: 2, PASS: 1, SKIP: 0}
# how gloo, NCCL (blocking waits, the watchdog) and torch's store say a collective waited too long
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


@dataclass
class Check:
    name: str
    status: str
    summary: str
    fix: str = ""
    figures: dict = field(default_factory=dict)


def guarded(name: str, function, *args, **kwargs) -> Check:
    """function(...) as a Check; an exception becomes a FAIL that quotes it. Only for checks without collectives,
    or whose collectives every rank takes whatever fails on its side."""
    try:
        return function(*args, **kwargs)
    except Exception as err:  # a check must report, never end the preflight
        first = (str(err).strip().splitlines() or [""])[0][:400]
        return Check(name, FAIL, f"{type(err).__name__}: {first}",
                     "see the message; rerun this check alone with the trainer to get the whole traceback")


def _waited(check: Check) -> bool:
    """A failure that only says its collective timed out: the rank waited for another that failed."""
    return check.status == FAIL and bool(_TIMED_OUT.search(check.summary))


def _listed(ranks: list[int]) -> str:
    return f"ranks {ranks[:16]}{' ...' if len(ranks) > 16 else ''}"


def merge(per_rank: list) -> list[Check]:
    """One Check per name over all ranks (a rank's list of dicts, or None for a rank that did not answer): the worst
    status; rank 0's text unless another rank is worse, then prefixed with the ranks that are. Among failures, one
    that is the rank's own comes before one that only timed out waiting for it, and the waiting ranks are named
    apart."""
    answered = [r for r, checks in enumerate(per_rank) if checks is not None]
    merged = []
    for i, first in enumerate(per_rank[answered[0]]):
        checks = {r: Check(**per_rank[r][i]) for r in answered if i < len(per_rank[r])}
        worst = max(checks, key=lambda r: (ORDER[checks[r].status], not _waited(checks[r]), -r))
        chosen = checks[worst]
        same = [r for r, c in checks.items() if c.status == chosen.status]
        waiting = [r for r in same if _waited(checks[r])] if not _waited(chosen) else []
        if len(per_rank) > 1 and (worst != 0 or waiting):
            culprits = [r for r in same if r not in waiting]
            chosen.summary = f"{_listed(culprits)}: {chosen.summary}" + (
                f"; {_listed(waiting)} waited for them until the timeout" if waiting else "")
        merged.append(chosen)
    silent = [r for r, checks in enumerate(per_rank) if checks is None]
    if silent:
        merged.append(Check("ranks", FAIL, f"ranks {silent[:16]} did not report within the timeout (hung or died)",
                            "look at those ranks' own output; a rank that hangs in a collective waits for one that "
                            "failed or lost the network"))
    return merged


def write_report(checks: list[Check], header: str, path: str | None) -> int:
    """Print the checks (and write them to `path`, if given); the exit code: 1 if anything FAILs."""
    print(header)
    for check in checks:
        print(f"{check.status:4s}  {check.name:13s} {check.summary}")
        if check.fix and check.status in (FAIL, WARN):
            print(f"      {'fix:':13s} {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN, PASS, SKIP)}
    where = ""
    if path:
        with open(path, "w") as f:
            json.dump({"header": header, "counts": counts, "checks": [asdict(c) for c in checks]}, f, indent=1)
        where = f"; written to {path}"
    print(f"result: {counts[FAIL]} FAIL, {counts[WARN]} WARN, {counts[PASS]} PASS, {counts[SKIP]} skipped{where}")
    return 1 if counts[FAIL] else 0
