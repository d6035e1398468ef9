#!/usr/bin/env python3
"""The helper's declared dependencies are exactly the libraries it imports, everywhere it is built:
helper/pyproject.toml (pip, the test venv), helper/package.nix (`dependencies`, the Nix package) and
the test bed guest's Debian packages (tests/vm/testbed.py). A declared library that nothing imports
is a defect, and so is an import that one of them would not install.

Run by tests/lint; exit status 1 with one line per difference.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "helper/src/nvidia_kmod_swap"

# import name -> (PyPI name, nixpkgs python3Packages attribute, Debian 12 package). A library the
# helper starts to import must be added here, with the names each world gives it.
LIBRARIES = {
    "elftools": ("pyelftools", "pyelftools", "python3-pyelftools"),
    "packaging": ("packaging", "packaging", "python3-packaging"),
    "pyudev": ("pyudev", "pyudev", "python3-pyudev"),
    "systemd": ("systemd-python", "systemd-python", "python3-systemd"),
    "zstandard": ("zstandard", "zstandard", "python3-zstandard"),
}


def imported() -> set[str]:
    """Top-level names of every module the helper imports that is neither its own nor the stdlib's."""
    names: set[str] = set()
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "nvidia_kmod_swap"}


def pyproject() -> set[str]:
    deps = tomllib.loads((REPO / "helper/pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in deps}


def package_nix() -> set[str]:
    text = (REPO / "helper/package.nix").read_text()
    block = re.search(r"\n  dependencies = with python3Packages; \[(.*?)\];", text, re.S)
    if not block:
        raise SystemExit("helper/package.nix: no `dependencies = with python3Packages; [ ... ];`")
    return set(block.group(1).split())


def guest() -> set[str]:
    text = (REPO / "tests/vm/testbed.py").read_text()
    block = re.search(r"GUEST_PACKAGES = \[(.*?)\]", text, re.S)
    if not block:
        raise SystemExit("tests/vm/testbed.py: no GUEST_PACKAGES")
    return set(re.findall(r'"(python3-[^"]+)"', block.group(1))) - {"python3-cffi-backend"}  # zstandard's backend


def main() -> int:
    uses = imported()
    unknown = uses - LIBRARIES.keys()
    problems = [f"helper imports {n!r}, which tests/dependencies.py does not know: add it to LIBRARIES" for n in sorted(unknown)]
    for column, where, declared in ((0, "helper/pyproject.toml", pyproject()), (1, "helper/package.nix", package_nix()),
                                    (2, "tests/vm/testbed.py GUEST_PACKAGES", guest())):
        wanted = {LIBRARIES[n][column] for n in uses if n in LIBRARIES}
        problems += [f"{where}: {d} is declared but nothing imports it" for d in sorted(declared - wanted)]
        problems += [f"{where}: {d} is imported but not declared" for d in sorted(wanted - declared)]
    for line in problems:
        print(line)
    if not problems:
        print(f"the helper imports {', '.join(sorted(uses))}; each place declares exactly these")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
