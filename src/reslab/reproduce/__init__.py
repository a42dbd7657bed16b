"""Named reproductions of the claims behind reslab. Each is one module with `add_arguments` and `run`; a plug-in
registers more (entry-point group `reslab.reproductions`: `name = package.module`)."""

from reslab.registry import REPRODUCTIONS, load, names


def get_reproduction(name: str):
    return load("reproduction", name)


def list_reproductions() -> list[str]:
    return names("reproduction")


__all__ = ["REPRODUCTIONS", "get_reproduction", "list_reproductions"]
