"""The one exception type a user can cause. The CLI prints it as a single line and exits with code 2."""


class ReslabError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class Interrupted(ReslabError):
    """Ctrl-C (or SIGTERM) stopped a command cleanly (a run at the end of a step, checkpointed; a prepare with its
    shards kept); the CLI prints the one line and exits 130."""


def check_positive(**sizes: int | float) -> None:
    """Raise ReslabError for the first size that is not a finite number > 0 (None: not given, passes)."""
    import math

    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ReslabError(f"{name} must be positive, got {value!r}")


def unknown(kind: str, name: str, choices) -> ReslabError:
    """The error for a name that is not in a registry, listing what is."""
    return ReslabError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")
