"""The no-op fast path: answers only when it is sure, otherwise hands over to the full CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fakesys import NEW, OLD, make_config, write_config, write_driver
from nvidia_kmod_swap.quick import try_noop

SRC = str(Path(__file__).resolve().parents[2] / "helper" / "src")


@pytest.fixture
def current(system, store, tmp_path):
    system.load_driver(NEW)
    config = write_config(tmp_path / "c.json", make_config(store, [write_driver(store, NEW)], [write_driver(store, OLD)]))
    return system, config


def args(system, config, command="check"):
    return ["--root", str(system.base), "--config", str(config), "--log-target", "stderr", command]


def test_versions_match(current, capsys):
    system, config = current
    assert try_noop(args(system, config)) == 0
    assert capsys.readouterr().err == ""
    assert try_noop(args(system, config, "swap")) == 0


def test_hands_over_whenever_unsure(current, tmp_path):
    system, config = current
    data = json.loads(config.read_text())
    assert try_noop(args(system, config, "plan")) is None
    assert try_noop(args(system, config) + ["--json"]) is None
    system.change("nvidia_uvm", version=OLD)
    assert try_noop(args(system, config)) is None                   # a half-swapped driver
    system.change("nvidia_uvm", version=NEW)
    (system.root(data["state_dir"])).mkdir(parents=True)
    (system.root(data["state_dir"]) / "swap.json").write_text("{}")
    assert try_noop(args(system, config)) is None                   # an interrupted swap
    (system.root(data["state_dir"]) / "swap.json").unlink()
    for bad in ({**data, "typo": 1}, {**data, "driver_version": 5}, [data]):
        write_config(tmp_path / "bad.json", bad)
        assert try_noop(args(system, tmp_path / "bad.json")) is None
    (tmp_path / "broken.json").write_text("{")
    assert try_noop(args(system, tmp_path / "broken.json")) is None
    system.modules.clear()
    system.sync()
    assert try_noop(args(system, config)) is None                   # nothing loaded


def test_imports_nothing_heavy(current):
    system, config = current
    code = (f"import sys; from nvidia_kmod_swap.cli import main; rc = main({args(system, config, 'swap')!r}); "
            "heavy = [m for m in ('argparse', 'dataclasses', 'nvidia_kmod_swap.plan', 'nvidia_kmod_swap.swap', "
            "'systemd', 'pyudev', 'zstandard', 'packaging', 'typing', 'datetime') if m in sys.modules]; print(rc, heavy)")
    # -S: no site-packages hooks (an editable install's finder imports typing), as a packaged helper runs
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out
