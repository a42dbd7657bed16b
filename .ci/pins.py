#!/usr/bin/env python3
"""Re-resolve reslab's dependencies to their newest releases and write them, every one pinned, to constraints.txt.

    python3 .ci/pins.py            # resolve (pip's resolver, nothing installed) and rewrite constraints.txt
    python3 .ci/pins.py --print    # only print what it would write

Every extra is resolved together (the runtime set, `test`, and the optional extras), with torch held at the build
that lies on this machine's disk. After a bump, run the README's test command on a fresh clone (or `.ci/latest`,
which tests the newest set without the pins) before committing the new constraints.txt. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; a looser torch pulls a multi-GB CUDA build
HEADER = f"""\
# Every package reslab's README commands install, pinned: the set the test suite was last green on.
# Re-resolve to the newest releases with: python3 .ci/pins.py   (then run the tests; .ci/latest tests unpinned)
# torch is the CPU build that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
{TORCH}
"""


def extras() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return sorted(project.get("optional-dependencies", {}))


def resolve(python: str) -> dict[str, str]:
    """name -> version of everything `pip install -e .[all extras]` would install now, torch held."""
    with tempfile.TemporaryDirectory() as tmp:
        torch_only, report = Path(tmp) / "torch.txt", Path(tmp) / "report.json"
        torch_only.write_text(TORCH + "\n")
        target = f"{ROOT}[{','.join(extras())}]"
        subprocess.run([python, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
                        str(report), "-c", str(torch_only), "-e", target], check=True)
        installs = json.loads(report.read_text())["install"]
    found = {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    found.pop("reslab", None)
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render(pins: dict[str, str]) -> str:
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if name != "torch"]
    return HEADER + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the new constraints instead of writing them")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip resolves (default: this)")
    args = parser.parse_args()
    text = render(resolve(args.python))
    if args.print:
        sys.stdout.write(text)
        return 0
    tmp = CONSTRAINTS.with_name(".constraints.txt.tmp")
    tmp.write_text(text)
    os.replace(tmp, CONSTRAINTS)
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({text.count('==')} pins); now run the README's test command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
