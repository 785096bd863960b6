"""Two trainers on one machine, as when a preflight or an evaluation runs beside a job, or two jobs share a CPU node:
each one's clips/s while both run at once, against its own alone. The phases take turns in rotated rounds (A alone,
B alone, both; B alone, both, A alone; ...), so a slow minute of the machine hits each of them, and a trainer's share
is the median over rounds of its rate at once over its rate alone in the same round. Two processes on the same cores
can reach 0.5 each (more where a trainer waits for data); the goal is at least 0.4 (README, "Sharing a machine")."""

import statistics

from tools.bench.contender import Contender

PHASES = ("A alone", "B alone", "both")


def share(cfg: dict, trainer, rounds: int) -> tuple[list[dict], dict]:
    """(a row per trainer and phase, {"share_A": ..., "share_B": ...}) for two `trainer(name)` Contenders."""
    trainers = [trainer(name) for name in "AB"]
    rates = {(name, phase): [] for name in "AB" for phase in ("alone", "both")}
    try:
        for t in trainers:
            t.wait_until_set_up()
        for r in range(rounds):
            for phase in PHASES[r % 3:] + PHASES[:r % 3]:
                running = trainers if phase == "both" else [trainers["AB".index(phase[0])]]
                for t in running:
                    t.start_round()
                for t, result in [(t, t.finish_round()) for t in running]:
                    if result:
                        name = "AB"[trainers.index(t)]
                        rates[name, "both" if phase == "both" else "alone"].append(result["items"] / result["seconds"])
    finally:
        for t in trainers:
            t.stop()
    errors = [t.error for t in trainers if t.error]
    if errors:
        return [{"name": f"share {cfg['e2e_recipe']}", "error": errors[0], "peak_mb": None}], {}
    rows = [{"name": f"share trainer {name} {phase}", "unit": "clips/s", "rounds": values,
             "median": statistics.median(values), "min": min(values), "max": max(values), "views_per_clip": 1,
             "views_per_s": statistics.median(values), "peak_mb": None}
            for (name, phase), values in rates.items()]
    found = {}
    for name in "AB":
        values = [both / alone for both, alone in zip(rates[name, "both"], rates[name, "alone"])]
        found[f"share_{name}_at_once_vs_alone"] = {"median": round(statistics.median(values), 3),
                                                    "min": round(min(values), 3), "max": round(max(values), 3),
                                                    "rounds": len(values)}
    return rows, found


def e2e_trainer(cfg: dict, recipe: str, ds_config: str, overrides: list):
    """A trainer for share(): the real one (tools/bench/model.py e2e), cfg['share_steps'] steps a round."""
    return lambda name: Contender(f"share trainer {name}", "tools.bench.model:e2e", cfg, recipe=recipe,
                                  ds_config=ds_config, steps=cfg["share_steps"], overrides=overrides)
