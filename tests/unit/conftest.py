"""pytest fixtures over fakesys.py (the fake /proc, /sys, /dev tree and real ELF module files).

The shared fakes live in fakesys.py, not here: a test module that imports from conftest breaks under
`--import-mode=importlib` (which nixpkgs' pytestCheckHook may use). This file puts the fakes' directory
and, when the helper is not installed (a plain checkout), its sources on sys.path; pytest always
imports conftest before the test modules of its directory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if importlib.util.find_spec("nvidia_kmod_swap") is None:
    sys.path.insert(0, str(HERE.parents[1] / "helper" / "src"))

from fakesys import FakeSystem  # noqa: E402
from nvidia_kmod_swap import devices, modinfo  # noqa: E402


@pytest.fixture(autouse=True)
def _no_facts_between_tests():
    """modinfo.py remembers module facts per process (a real helper is one run over one config):
    each test starts with none, and remembers only what it asks for."""
    modinfo.forget()
    yield
    modinfo.forget()


@pytest.fixture
def system(tmp_path, monkeypatch) -> FakeSystem:
    fake = FakeSystem(tmp_path / "root")

    # Device nodes: as root, FakeSystem makes real ones under dev/ and the helper stats them. Without
    # CAP_MKNOD (a Nix build sandbox) the helper's stat is replaced by a look at FakeSystem.nodes.
    if fake.real_nodes:
        return fake

    def node_problem(root, node):
        actual = fake.nodes.get(node.path)
        if actual is None:
            return f"{node.path} is missing"
        if actual != (node.major, node.minor):
            return f"{node.path} is {actual[0]}:{actual[1]}, the driver registered {node.major}:{node.minor}"
        return None

    def char_nodes(root, directory):
        return {path: number for path, number in fake.nodes.items() if path.rpartition("/")[0] == directory}

    monkeypatch.setattr(devices, "node_problem", node_problem)
    monkeypatch.setattr(devices, "char_nodes", char_nodes)
    return fake


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "nix/store"
    path.mkdir(parents=True)
    return path
