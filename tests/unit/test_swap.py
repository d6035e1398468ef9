"""The swap state machine against a fake kernel that can fail or crash at any step."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time

import pytest

from fakesys import BEFORE, FULL, NEW, OLD, Crash, FakeEffects, make_config, swapper, write_driver
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.swap import (
    EXIT_DEFERRED,
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_ROLLBACK_FAILED,
    EXIT_ROLLED_BACK,
    STATE_FILE,
    Swapper,
)


@pytest.fixture
def setup(system, store):
    old_dir, new_dir = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    config = parse(make_config(store, [new_dir], [old_dir]))
    return system, config


def state_file(system, config):
    return system.root(config.state_dir) / STATE_FILE


def test_swap_replaces_every_module(setup):
    system, config = setup
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions() == FULL
    assert not state_file(system, config).exists()
    record = json.loads((system.root(config.state_dir) / "loaded.json").read_text())
    # The four loaded, and nvidia_peermem, which the driver ships beside them (a later modprobe
    # loads it from there, and a rollback needs its file).
    assert record["driver_version"] == NEW
    assert sorted(m["name"] for m in record["modules"]) == sorted([*FULL, "nvidia_peermem"])
    assert oct(os.stat(system.root(config.state_dir)).st_mode & 0o777) == "0o700"


def test_second_run_is_a_noop(setup):
    system, config = setup
    swapper(system, config).run()
    kernel = FakeEffects(system)
    assert swapper(system, config, kernel).run() == EXIT_OK
    assert kernel.calls == []


@pytest.mark.parametrize("step", [("load", "nvidia"), ("load", "nvidia_modeset"), ("load", "nvidia_uvm"),
                                  ("load", "nvidia_drm"), ("unload", "nvidia_uvm"), ("unload", "nvidia")])
def test_failure_at_any_step_rolls_back_to_the_old_driver(setup, step, capsys):
    system, config = setup
    kernel = FakeEffects(system, fail_on={step})
    assert swapper(system, config, kernel).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE
    assert not state_file(system, config).exists()
    err = capsys.readouterr().err
    assert f"{step[0]} {step[1]}" in err and "rolled back: the NVIDIA driver 570.124.04 is loaded again" in err


def test_parameters_survive_swap_and_rollback(setup):
    system, config = setup
    (system.base / "etc/modprobe.d/nv.conf").write_text("options nvidia-drm modeset=1\n")
    kernel = FakeEffects(system, fail_on={("load", "nvidia_drm")})
    swapper(system, config, kernel).run()
    assert system.modules["nvidia_drm"].params == "modeset=1"  # the rolled-back old one
    swapper(system, config, retry=True).run()
    assert system.modules["nvidia_drm"].params == "modeset=1" and system.versions() == FULL


def test_verify_command_mismatch_rolls_back(setup, tmp_path):
    system, config = setup
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {OLD}\n")
    smi.chmod(0o755)
    config = parse({**make_config(tmp_path / "nix/store", [], []), **{k: v for k, v in _raw(config).items()},
                    "verify_command": [str(smi)]})
    assert swapper(system, config).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE


def test_stale_uvm_node_is_replaced_by_udev(setup):
    """mknod'd nodes survive an unload; a new nvidia-uvm major leaves the old node stale."""
    system, config = setup
    system.uvm_major = 509  # the reload gets another dynamic major; mknod of the rule hits EEXIST
    assert swapper(system, config).run() == EXIT_OK
    assert system.nodes["/dev/nvidia-uvm"] == (509, 0) and system.nodes["/dev/nvidia-uvm-tools"] == (509, 1)


def test_rollback_failure_keeps_state_and_says_so(setup, capsys):
    system, config = setup
    kernel = FakeEffects(system, fail_on={("load", "nvidia_uvm")})
    original_load = kernel.load

    def load(path, params):
        if OLD in path and "nvidia-modeset" in path:
            raise __import__("nvidia_kmod_swap.effects", fromlist=["KmodError"]).KmodError("load", path, 5)
        original_load(path, params)

    kernel.load = load
    assert swapper(system, config, kernel).run() == EXIT_ROLLBACK_FAILED
    assert state_file(system, config).exists()
    assert "rollback failed" in capsys.readouterr().err
    # The next run finishes the rollback first; the failed swap itself is retried only on request.
    assert swapper(system, config).run() == EXIT_REFUSED
    assert system.versions() == BEFORE and not state_file(system, config).exists()
    assert swapper(system, config, retry=True).run() == EXIT_OK
    assert system.versions() == FULL


def _kernel_calls_in_a_swap(system, config):
    probe = FakeEffects(system)
    snapshot = dict(system.modules)
    swapper(system, config, probe).run()
    system.modules = snapshot
    system.sync()
    return len(probe.calls)


def test_crash_at_every_step_recovers_to_a_consistent_driver(setup):
    system, config = setup
    steps = _kernel_calls_in_a_swap(system, config)
    assert steps == 8
    for crash_at in range(steps):
        system.modules = {}
        system.load_driver(OLD)
        state_file(system, config).unlink(missing_ok=True)
        with pytest.raises(Crash):
            swapper(system, config, FakeEffects(system, crash_at_call=crash_at)).run()
        assert state_file(system, config).exists(), crash_at
        # The next start recovers: all old, never a mix. A swap that had changed the kernel when
        # it was killed is recorded as failed and not tried again (issue 22: a swap that kills
        # its run would take the GPU away on every restart); `swap --retry` tries it.
        code = swapper(system, config).run()
        assert not state_file(system, config).exists()
        if code == EXIT_REFUSED:
            assert system.versions() == BEFORE, crash_at
            assert "interrupted at" in json.loads((system.root(config.state_dir) / "failed.json").read_text())["reason"]
            code = swapper(system, config, retry=True).run()
        assert code == EXIT_OK, crash_at
        assert system.versions() == FULL, crash_at


def test_crash_after_loading_everything_keeps_the_new_driver(setup):
    system, config = setup
    s = swapper(system, config, kill_at_step=None)
    # Crash during verification: state says "verifying", every new module is loaded.
    original = Swapper._verify
    Swapper._verify = lambda self, *args: (_ for _ in ()).throw(Crash())
    try:
        with pytest.raises(Crash):
            s.run()
    finally:
        Swapper._verify = original
    assert json.loads(state_file(system, config).read_text())["phase"] == "verifying"
    kernel = FakeEffects(system)
    assert swapper(system, config, kernel).run() == EXIT_OK
    assert kernel.calls == []  # kept, not reloaded
    assert system.versions() == FULL


def test_busy_defers_without_touching(setup):
    system, config = setup
    system.hold_device(77, "python3", "train.service")
    kernel = FakeEffects(system)
    assert swapper(system, config, kernel).run() == EXIT_DEFERRED
    assert kernel.calls == [] and system.versions() == BEFORE


@pytest.fixture
def busy_stop_units(system, store):
    """train.service (pid 77) holds /dev/nvidia0; on_busy=stop-units may stop it."""
    old_dir, new_dir = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    return system, parse(make_config(store, [new_dir], [old_dir], on_busy="stop-units", stop_units=["train.service"]))


def test_stop_units_stops_swaps_and_starts_again(busy_stop_units):
    system, config = busy_stop_units
    def systemctl(args):
        if args[0] == "stop":
            system.release_device(77)

    effects = FakeEffects(system, on_systemctl=systemctl)
    assert swapper(system, config, effects).run() == EXIT_OK
    assert effects.systemctl_calls == [["stop", "train.service"], ["start", "--no-block", "train.service"]]
    assert system.versions() == FULL


def test_stop_units_that_do_not_free_the_gpu_defer_and_restart_them(busy_stop_units):
    system, config = busy_stop_units
    effects = FakeEffects(system)
    assert swapper(system, config, effects).run() == EXIT_DEFERRED
    assert effects.systemctl_calls[-1] == ["start", "--no-block", "train.service"] and system.versions() == BEFORE


def test_refused_plan_changes_nothing(system, store):
    system.load_driver(OLD)
    config = parse(make_config(store, [write_driver(store, NEW)], []))  # no rollback files
    kernel = FakeEffects(system)
    assert swapper(system, config, kernel).run() == EXIT_REFUSED
    assert kernel.calls == []


def test_a_second_run_waits_for_the_lock_then_finds_nothing_to_do(setup):
    system, config = setup
    first = swapper(system, config)
    first.state.ensure()
    fd = os.open(system.root(config.state_dir) / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    results = {}

    def second():
        results["code"] = swapper(system, config).run()

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)
    assert "code" not in results  # waiting
    assert first.run.__self__ is first
    # The holder of the lock swaps meanwhile (as another process would).
    FakeEffects(system)  # noqa
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    thread.join(10)
    assert results["code"] == EXIT_OK and system.versions() == FULL


def test_load_when_nothing_is_loaded(system, store):
    new_dir = write_driver(store, NEW)
    config = parse(make_config(store, [new_dir], []))
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions() == FULL


def test_a_failed_load_from_nothing_keeps_what_loaded(system, store):
    """Issue 22: a load with no driver before it is never rolled back to no driver (at boot, one
    GPU of eight failing would leave none working): what loaded stays, the failure is recorded."""
    config = parse(make_config(store, [write_driver(store, NEW)], []))
    kernel = FakeEffects(system, fail_on={("load", "nvidia_drm")})
    assert swapper(system, config, kernel).run() == EXIT_LOAD_FAILED
    assert system.versions() == {"nvidia": NEW, "nvidia_modeset": NEW, "nvidia_uvm": NEW}
    assert (system.root(config.state_dir) / "failed.json").exists()


def _raw(config):
    return {"driver_version": config.driver_version, "kernel_release": config.kernel_release,
            "module_dirs": list(config.module_dirs), "rollback_dirs": list(config.rollback_dirs),
            "state_dir": config.state_dir, "settle_timeout_s": config.settle_timeout_s,
            "allowed_prefixes": list(config.allowed_prefixes)}


def test_a_failed_swap_is_not_retried_on_every_restart(setup, capsys):
    """Restart=always would otherwise swap and roll back in a loop."""
    system, config = setup
    assert swapper(system, config, FakeEffects(system, fail_on={("load", "nvidia_uvm")})).run() == EXIT_ROLLED_BACK
    kernel = FakeEffects(system)
    assert swapper(system, config, kernel).run() == EXIT_REFUSED
    assert kernel.calls == []
    assert "already failed and was rolled back" in capsys.readouterr().err
    assert swapper(system, config, kernel, retry=True).run() == EXIT_OK
    assert system.versions() == FULL
    assert not (system.root(config.state_dir) / "failed.json").exists()
