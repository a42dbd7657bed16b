"""The one exception type a user can cause. The CLI prints it as a single line and exits with code 2."""


class ReslabError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class Interrupted(ReslabError):
    """Ctrl-C (or SIGTERM) stopped a command cleanly (a run at the end of a step, checkpointed; a prepare with its
    shards kept); the CLI prints the one line and exits 130."""


def unknown(kind: str, name: str, choices) -> ReslabError:
    """The error for a name that is not in a registry, listing what is."""
    return ReslabError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")
