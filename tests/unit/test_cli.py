"""The CLI contract, end to end on fake trees: status/plan/check/swap, exit codes, JSON shapes."""

from __future__ import annotations

import json

import pytest

from fakesys import NEW, OLD, FakeEffects, make_config, write_config, write_driver
from nvidia_kmod_swap.cli import main


@pytest.fixture
def bed(system, store, tmp_path):
    old_dir, new_dir = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    config = write_config(tmp_path / "config.json", make_config(store, [new_dir], [old_dir]))
    return system, config


def run(system, config, *args, **kw):
    return main(["--root", str(system.base), "--config", str(config), "--log-target", "stderr", *args], **kw)


def test_plan_json(bed, capsys):
    system, config = bed
    assert run(system, config, "plan", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["action"] == "swap"
    assert data["unload"] == ["nvidia_drm", "nvidia_uvm", "nvidia_modeset", "nvidia"]
    assert [s["name"] for s in data["load"]] == ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    assert all(set(s) == {"name", "path", "params", "version", "srcversion", "depends"} for s in data["load"])


def test_status_json(bed, capsys):
    system, config = bed
    system.hold_device(99, "python3", "job.service")
    assert run(system, config, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["loaded_version"] == OLD and data["expected_version"] == NEW
    assert {m["name"] for m in data["modules"]} == {"nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"}
    assert data["gpu_holders"] == [{"pid": 99, "comm": "python3", "path": "/dev/nvidia0", "unit": "job.service"}]


def test_human_outputs(bed, capsys):
    system, config = bed
    assert run(system, config, "status") == 0
    assert run(system, config, "plan") == 0
    out = capsys.readouterr().out
    assert f"loaded driver:   {OLD}" in out and "action: swap" in out


def test_check_exit_codes(bed, store, tmp_path):
    system, config = bed
    assert run(system, config, "check") == 0                      # a swap can run
    system.hold_device(99, "python3", "job.service")
    assert run(system, config, "check") == 1                      # deferred: skip the unit
    system.release_device(99)
    bad = write_config(tmp_path / "bad.json", make_config(store, [write_driver(store / "x", NEW)], []))
    assert run(system, bad, "check") == 255                       # refused: no rollback files
    kernel = write_config(tmp_path / "k.json", {**json.loads(config.read_text()), "kernel_release": "6.1.0-99-amd64"})
    assert run(system, kernel, "check") == 1                      # new kernel: deferred


def test_broken_config_names_the_key(bed, tmp_path, capsys):
    system, config = bed
    data = json.loads(config.read_text())
    for broken, words in (({**data, "on_bussy": "defer"}, "'on_bussy'"),
                          ({**data, "module_dirs": "/nix/store"}, "'module_dirs'"),
                          ({**data, "settle_timeout_s": -1}, "'settle_timeout_s'")):
        path = write_config(tmp_path / "broken.json", broken)
        assert run(system, path, "check") == 255
        assert words in capsys.readouterr().err
    (tmp_path / "notjson.json").write_text("{")
    assert run(system, tmp_path / "notjson.json", "swap") == 255
    assert "not valid JSON" in capsys.readouterr().err
    assert run(system, tmp_path / "missing.json", "status") == 255


def test_swap_needs_a_kernel_outside_the_live_root(bed):
    system, config = bed
    assert run(system, config, "swap") == 1
    assert system.versions()["nvidia"] == OLD


def test_swap_through_the_cli(bed):
    system, config = bed
    assert run(system, config, "swap", effects=FakeEffects(system)) == 0
    assert set(system.versions().values()) == {NEW}
    assert run(system, config, "check") == 0


def test_help_explains_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "exit codes" in capsys.readouterr().out
