"""When an `*_every` action falls: every N optimizer steps (checkpoints, logs, pictures) or epochs (validations,
probes), 0 meaning never. One rule for every such option."""


def due(count: int, every: int) -> bool:
    """Whether an action done every `every` steps or epochs falls on step or epoch `count` (0: never)."""
    return bool(every) and count % every == 0
