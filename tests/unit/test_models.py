"""The helper's typed records are NamedTuples, its two mutable objects plain classes: no dataclasses.

On the guest's CPython 3.11 a frozen dataclass compiles each generated method with its own `exec`
(Lib/dataclasses.py `_create_fn`: six for a frozen class), and `dataclasses` imports `inspect`
(with `ast`, `dis`, `tokenize`): ~165 ms of a swap's CPU there (docs/performance.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nvidia_kmod_swap.plan import LoadStep, Plan
from nvidia_kmod_swap.state import DeferredRecord, StateDir, SwapState

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "helper", "src")
MODULES = ["cli", "config", "devices", "effects", "facts", "holders", "journal", "modinfo", "params", "paths",
           "plan", "quick", "rules", "snapshot", "state", "swap"]


def test_helper_imports_neither_dataclasses_nor_inspect():
    code = (f"import sys\nfor m in {MODULES!r}: __import__('nvidia_kmod_swap.' + m)\n"
            "print([m for m in ('dataclasses', 'inspect', 'ast', 'dis') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out


def test_records_are_immutable_and_compare_by_value():
    step = LoadStep("nvidia", "/nix/store/x/nvidia.ko", "", "580.1", "ABC")
    with pytest.raises(AttributeError):
        step.path = "/elsewhere"  # type: ignore[misc]
    assert step == LoadStep("nvidia", "/nix/store/x/nvidia.ko", version="580.1", srcversion="ABC")
    assert hash(step) == hash(LoadStep("nvidia", "/nix/store/x/nvidia.ko", "", "580.1", "ABC"))
    plan = Plan("swap", "why", "580.2", "580.1", "6.1", "6.1", load=(step,))
    assert plan.to_json()["load"] == [{"name": "nvidia", "path": "/nix/store/x/nvidia.ko", "params": "",
                                       "version": "580.1", "srcversion": "ABC", "depends": None}]
    assert "path='/nix/store/x/nvidia.ko'" in repr(step)


def test_swap_state_is_mutable_and_round_trips(tmp_path):
    step = LoadStep("nvidia", "/nix/store/x/nvidia.ko")
    state = SwapState("580.2", "580.1", (step,), (step,))
    assert state.stopped_units == [] and state.started == state.updated > 0
    assert SwapState("580.2", "580.1", (), ()).stopped_units is not state.stopped_units  # not shared
    state.phase, state.step = "loading", 3
    state.stopped_units.append("cuda-job.service")
    with pytest.raises(AttributeError):
        state.no_such_field = 1  # type: ignore[attr-defined]  # __slots__: a typo fails
    store = StateDir(tmp_path)
    store.write("swap.json", state.to_json())
    assert store.swap_state() == state
    assert "phase='loading'" in repr(state)
    with pytest.raises(TypeError):
        hash(state)


def test_deferred_record_keeps_its_first_since(tmp_path):
    store = StateDir(tmp_path)
    first = store.record_deferral(DeferredRecord("580.2", "580.1", "idle", "busy", (1,), (), 100.0))
    again = store.record_deferral(DeferredRecord("580.2", "580.1", "idle", "still busy", (1,), (), 200.0))
    assert (first.since, again.since, store.deferred().since) == (100.0, 100.0, 100.0)
