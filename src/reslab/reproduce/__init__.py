"""Named reproductions of the claims behind reslab. Each is one module with `add_arguments` and `run`."""

from importlib import import_module

from reslab.errors import unknown
from reslab.registry import REPRODUCTIONS


def get_reproduction(name: str):
    if name not in REPRODUCTIONS:
        raise unknown("reproduction", name, REPRODUCTIONS)
    return import_module(REPRODUCTIONS[name])
