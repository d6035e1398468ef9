#!/usr/bin/env python3
"""The helper's declared dependencies are exactly the libraries it imports, everywhere it is built:
helper/pyproject.toml (pip, the test venv), helper/package.nix (`dependencies`, the Nix package) and
the test bed guest's Debian packages (tests/vm/testbed.py); and its unit tests' are exactly what
they import (pyproject's `test` extra, package.nix's `nativeCheckInputs`). A declared library that
nothing imports is a defect, and so is an import that one of them would not install.

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
UNIT_TESTS = REPO / "tests/unit"

# import name -> (PyPI name, nixpkgs python3Packages attribute, Debian 12 package). A library the
# helper starts to import must be added here, with the names each world gives it.
LIBRARIES = {
    "elftools": ("pyelftools", "pyelftools", "python3-pyelftools"),
    "packaging": ("packaging", "packaging", "python3-packaging"),
    "pyudev": ("pyudev", "pyudev", "python3-pyudev"),
    "systemd": ("systemd-python", "systemd-python", "python3-systemd"),
    "zstandard": ("zstandard", "zstandard", "python3-zstandard"),
}
# The unit tests' own: import name -> (PyPI name, what package.nix's nativeCheckInputs names).
TEST_LIBRARIES = {
    "elftools": ("pyelftools", "python3Packages.pyelftools"),
    "pytest": ("pytest", "python3Packages.pytestCheckHook"),
}


def imported(directory: Path = SOURCE, own: frozenset[str] = frozenset({"nvidia_kmod_swap"})) -> set[str]:
    """Top-level names of every module the files in DIRECTORY import that is neither OWN nor the stdlib's."""
    names: set[str] = set()
    for path in directory.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in own}


def pyproject(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "helper/pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in deps}


def package_nix(attribute: str = "dependencies = with python3Packages;") -> set[str]:
    text = (REPO / "helper/package.nix").read_text()
    block = re.search(r"\n  " + re.escape(attribute) + r" \[(.*?)\];", text, re.S)
    if not block:
        raise SystemExit(f"helper/package.nix: no `{attribute} [ ... ];`")
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
    test_uses = imported(UNIT_TESTS, frozenset({"nvidia_kmod_swap", "fakesys", "conftest"})) - uses
    problems += [f"tests/unit import {n!r}, which tests/dependencies.py does not know: add it to TEST_LIBRARIES"
                 for n in sorted(test_uses - TEST_LIBRARIES.keys())]
    nix_checks = {d for d in package_nix("nativeCheckInputs =") if d.startswith("python3Packages.")}
    for column, where, declared in ((0, "helper/pyproject.toml [test]", pyproject("test")),
                                    (1, "helper/package.nix nativeCheckInputs", nix_checks)):
        wanted = {TEST_LIBRARIES[n][column] for n in test_uses if n in TEST_LIBRARIES}
        problems += [f"{where}: {d} is declared but no unit test imports it" for d in sorted(declared - wanted)]
        problems += [f"{where}: {d} is imported by the unit tests but not declared" for d in sorted(wanted - declared)]
    for line in problems:
        print(line)
    if not problems:
        print(f"the helper imports {', '.join(sorted(uses))}, its unit tests also {', '.join(sorted(test_uses))};"
              " each place declares exactly these")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
