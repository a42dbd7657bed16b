"""Module paths as `named_modules` spells them ("" is the model itself)."""


def inside(path: str, ancestor: str) -> bool:
    """Is `path` the module `ancestor` or nested in it?"""
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def relative(path: str, base: str | None) -> str:
    """`path` as seen from inside `base` ("blocks.0.attn" from "blocks.0" is "attn"); "(model)" for the model."""
    if base and path.startswith(base + "."):
        return path[len(base) + 1:]
    return path or "(model)"
