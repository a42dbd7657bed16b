"""Reproducible installs: every package the README's commands install is pinned in constraints.txt, and the
environment the suite runs in is that pinned set (a fresh clone must not pick up a release nobody tested)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, SpecifierSet]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement.specifier
    return found


def declared() -> list[Requirement]:
    """Every requirement pyproject.toml names: the runtime set and every extra."""
    texts = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return [Requirement(text) for text in texts]


def installed_closure(root: str = "reslab", extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """name -> installed version of everything `root[extras]` pulls in here, followed through each package's
    own requirements (markers evaluated for this interpreter)."""
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker or extra is not installed here
        key = canonicalize_name(name)
        if key in seen and not wanted:
            continue
        seen[key] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                if canonicalize_name(requirement.name) not in seen:
                    todo.append((requirement.name, tuple(requirement.extras)))
    seen.pop("reslab", None)
    return seen


def test_readme_commands_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"pip install [^\n`]*", readme)
    assert commands, "the README's install commands moved; update this test"
    assert all("-c constraints.txt" in command for command in commands), commands


def test_every_declared_dependency_is_pinned():
    pinned = pins()
    loose = [str(r) for r in declared() if canonicalize_name(r.name) not in pinned]
    assert not loose, f"pin these in constraints.txt (python3 .ci/pins.py): {loose}"
    exact = {name: spec for name, spec in pinned.items() if len(spec) == 1 and next(iter(spec)).operator == "=="}
    assert exact == pinned, f"constraints.txt pins with == only: {set(pinned) - set(exact)}"


def test_every_installed_dependency_is_pinned():
    """The whole closure, transitive requirements included: one unpinned package deep down can break the suite."""
    closure = installed_closure()
    assert len(closure) > 40, "the test extra's closure was not followed"
    unpinned = sorted(set(closure) - set(pins()))
    assert not unpinned, f"installed but not pinned in constraints.txt (python3 .ci/pins.py): {unpinned}"


def test_installed_versions_are_the_pinned_ones():
    """Deselected by .ci/latest, which runs the suite on the newest releases on purpose."""
    pinned = pins()
    differ = {name: (version, str(pinned[name])) for name, version in installed_closure().items()
              if name in pinned and not pinned[name].contains(version, prereleases=True)}
    assert not differ, f"installed versions differ from constraints.txt (reinstall with -c constraints.txt): {differ}"
