"""Issue 11: a crowded machine. Each test fails on the helper before issue 11 (eaa63a5): the
kernel autoloading the booted driver into the swap's gap, nvidia-modprobe's nodes left on a stale
major, a momentary GPU holder failing the swap, a deferred swap that never finished by itself."""

from __future__ import annotations

import json
import time

import pytest

from fakesys import BEFORE, FULL, NEW, OLD, FakeEffects, cli, config_for, make_config, swapper, write_config, write_driver
from nvidia_kmod_swap.config import ConfigError
from nvidia_kmod_swap.facts import make_plan
from nvidia_kmod_swap.quick import try_noop
from nvidia_kmod_swap.swap import EXIT_DEFERRED, EXIT_OK, EXIT_ROLLED_BACK


@pytest.fixture
def trees(store):
    return write_driver(store, OLD), write_driver(store, NEW)


# -- 2. DRM clients --------------------------------------------------------------------------------
def modeset_driver(system):
    """The old driver with nvidia_drm.modeset=1 from modprobe.d (NixOS: hardware.nvidia.modesetting)."""
    (system.base / "etc/modprobe.d/nvidia.conf").write_text("options nvidia_drm modeset=1\n")
    system.load_driver(OLD, names=("nvidia", "nvidia_modeset", "nvidia_uvm"))
    system.add("nvidia_drm", OLD, params="modeset=1")


def test_a_compositor_on_the_nvidia_drm_node_is_named_with_pid_and_unit(system, store, trees):
    modeset_driver(system)
    system.hold_device(900, "Xorg", "display-manager.service", "/dev/dri/card0", module="nvidia_drm")
    system.hold_device(901, "gnome-shell", "session-2.scope", "/dev/dri/card1", module="i915")  # the iGPU: not ours
    plan = make_plan(system.root, config_for(store, trees))
    assert plan.action == "defer", plan.reason
    assert "pid 900 (Xorg) holds /dev/dri/card0 [display-manager.service]" in plan.reason, plan.reason
    assert "901" not in plan.reason and "kernel" not in plan.reason


def test_stop_units_stops_the_display_manager_holding_nvidia_drm_and_starts_it_again(system, store, trees):
    modeset_driver(system)
    system.hold_device(900, "Xorg", "display-manager.service", "/dev/dri/card0", module="nvidia_drm")

    def systemctl(args):
        if args == ["stop", "display-manager.service"]:
            system.release_device(900)

    effects = FakeEffects(system, on_systemctl=systemctl)
    config = config_for(store, trees, on_busy="stop-units", stop_units=["display-manager.service"])
    assert swapper(system, config, effects).run() == EXIT_OK
    assert system.versions() == FULL
    assert system.modules["nvidia_drm"].params == "modeset=1"
    assert effects.systemctl_calls == [["stop", "display-manager.service"],
                                       ["start", "--no-block", "display-manager.service"]]


def test_a_kernel_only_reference_is_explained_in_words_a_user_can_act_on(system, store, trees):
    modeset_driver(system)
    system.change("nvidia_drm", refcnt_extra=1)  # fbcon on the NVIDIA framebuffer (fbdev=1)
    plan = make_plan(system.root, config_for(store, trees))
    assert plan.action == "defer"
    assert "nvidia_drm has 1 reference(s) from the kernel, not from a process" in plan.reason, plan.reason
    assert "vtconsole" in plan.reason and "nvidia_drm.fbdev=0" in plan.reason


# -- 4. no autoload in the swap window ------------------------------------------------------------
def test_the_kernel_cannot_autoload_the_booted_driver_into_the_gap(system, store, trees):
    system.load_driver(OLD)
    effects = FakeEffects(system, autoload_from=trees[0] / "misc/nvidia.ko")
    assert swapper(system, config_for(store, trees), effects).run() == EXIT_OK
    assert system.versions() == FULL and effects.autoloads == 0
    # The block is gone; what stays routes later loads by name to the new driver (byname.py).
    assert [p.name for p in system.modprobe_confs()] == ["nvidia-kmod-swap.driver.conf"], "the block outlived the swap"


def test_the_rollback_also_keeps_autoload_out_and_lifts_the_block(system, store, trees):
    system.load_driver(OLD)
    effects = FakeEffects(system, autoload_from=trees[0] / "misc/nvidia.ko",
                          always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config_for(store, trees), effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE and effects.autoloads == 0
    assert system.modprobe_confs() == []


def test_a_block_left_by_a_killed_run_is_lifted_by_the_next(system, store, trees, tmp_path):
    system.load_driver(NEW)
    block = system.base / "run/modprobe.d/nvidia-kmod-swap.conf"
    block.parent.mkdir(parents=True)
    block.write_text("install nvidia false\n")
    path = write_config(tmp_path / "c.json", make_config(store, [trees[1]], [trees[0]]))
    # the no-op fast path does not answer while the block is there: the full path removes it
    assert try_noop(["--root", str(system.base), "--config", str(path), "swap"]) is None
    assert cli(system, store, trees, tmp_path, "swap", effects=FakeEffects(system)) == EXIT_OK
    assert not block.exists()


# -- 5. nodes nvidia-modprobe made, on a dynamic major ---------------------------------------------
def test_nvidia_caps_nodes_follow_the_new_major(system, store, trees):
    system.load_driver(OLD)
    system.nvidia_modprobe_caps(1, 2)
    before = system.caps_major
    assert swapper(system, config_for(store, trees), FakeEffects(system)).run() == EXIT_OK
    assert system.caps_major != before
    assert system.nodes["/dev/nvidia-caps/nvidia-cap1"] == (system.caps_major, 1)
    assert system.nodes["/dev/nvidia-caps/nvidia-cap2"] == (system.caps_major, 2)


def test_nvidia_caps_nodes_follow_the_rollback_too(system, store, trees):
    system.load_driver(OLD)
    system.nvidia_modprobe_caps(1)
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config_for(store, trees), effects).run() == EXIT_ROLLED_BACK
    assert system.nodes["/dev/nvidia-caps/nvidia-cap1"] == (system.caps_major, 1)


# -- 6. a holder for a moment, between check and swap ----------------------------------------------
@pytest.fixture
def meanwhile(monkeypatch):
    """meanwhile(action): ACTION runs when the helper first sleeps (waiting for a holder to go), so
    that "the holder goes away while we wait" happens deterministically, not on a timer thread."""
    real_sleep = time.sleep
    pending = []

    def sleep(seconds):
        while pending:
            pending.pop(0)()
        real_sleep(min(seconds, 0.01))

    monkeypatch.setattr(time, "sleep", sleep)
    return pending.append


def test_a_momentary_holder_is_waited_for_not_deferred(system, store, trees, meanwhile):
    system.load_driver(OLD)
    system.hold_device(4242, "nvidia-smi", "nvidia-container-toolkit-cdi-generator.service", "/dev/nvidiactl")
    meanwhile(lambda: system.release_device(4242))
    code = swapper(system, config_for(store, trees, busy_grace_s=5), FakeEffects(system)).run()
    assert code == EXIT_OK and system.versions() == FULL


def test_check_waits_for_a_momentary_holder_too(system, store, trees, tmp_path, meanwhile):
    system.load_driver(OLD)
    system.hold_device(4242, "nvidia-smi", None, "/dev/nvidiactl")
    meanwhile(lambda: system.release_device(4242))
    assert cli(system, store, trees, tmp_path, "check", busy_grace_s=5) == 0


def test_a_lasting_holder_is_deferred_after_the_grace_with_a_record(system, store, trees):
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    config = config_for(store, trees, busy_grace_s=0.3)
    assert swapper(system, config, FakeEffects(system)).run() == EXIT_DEFERRED
    record = json.loads((system.root(config.state_dir) / "deferred.json").read_text())
    assert record["waits_for"] == "idle" and record["holder_units"] == ["train.service"]
    assert record["expected_version"] == NEW and record["loaded_version"] == OLD
    # deferred again later: `since` is the first deferral's
    assert swapper(system, config, FakeEffects(system)).run() == EXIT_DEFERRED
    again = json.loads((system.root(config.state_dir) / "deferred.json").read_text())
    assert again["since"] == record["since"]


def test_an_unload_refused_for_a_moment_is_retried_within_the_grace(system, store, trees, meanwhile):
    """An NVML client opens /dev/nvidiactl after the holder scan: delete_module says EAGAIN."""
    system.load_driver(OLD)
    effects = FakeEffects(system)
    original = effects.unload

    def unload(name):
        if name == "nvidia" and not meanwhile_done:
            meanwhile_done.append(1)
            system.change("nvidia", refcnt_extra=1)
            meanwhile(lambda: system.change("nvidia", refcnt_extra=0))
        original(name)

    meanwhile_done: list[int] = []
    effects.unload = unload
    assert swapper(system, config_for(store, trees, busy_grace_s=3), effects).run() == EXIT_OK
    assert system.versions() == FULL


# -- 7. a deferred swap finishes by itself ---------------------------------------------------------
def test_retry_deferred_starts_the_swap_unit_once_the_gpu_is_idle(system, store, trees, tmp_path):
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    units = ["nvidia-container-toolkit-cdi-generator.service", "gpu-power-limit.service"]
    overrides = dict(busy_grace_s=0, gpu_units=units)
    assert cli(system, store, trees, tmp_path, "check", **overrides) == 1       # deferred: unit skipped
    config = config_for(store, trees, **overrides)

    def systemctl(args):  # systemd runs the unit: its ExecStartPre is `swap`
        if args == ["start", "nvidia-persistenced.service"]:
            assert swapper(system, config, FakeEffects(system)).run() == EXIT_OK

    effects = FakeEffects(system, on_systemctl=systemctl)
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=effects, **overrides) == 0
    assert effects.systemctl_calls == [], "started while the GPU was still busy"
    assert system.versions() == BEFORE
    system.release_device(77)                                                   # the job ends
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=effects, **overrides) == 0
    assert effects.systemctl_calls == [["start", "nvidia-persistenced.service"], ["restart", "--no-block", *units]]
    assert system.versions() == FULL
    assert not (system.root(config.state_dir) / "deferred.json").exists()
    # nothing deferred any more: the timer's next tick is the fast path's, and does nothing
    path = write_config(tmp_path / "config.json", make_config(store, [trees[1]], [trees[0]], **overrides))
    assert try_noop(["--root", str(system.base), "--config", str(path), "retry-deferred"]) == 0


def test_retry_deferred_leaves_a_kernel_change_to_the_reboot(system, store, trees, tmp_path):
    system.load_driver(OLD)
    assert cli(system, store, trees, tmp_path, "check", kernel_release="6.12.0-nixos") == 1
    effects = FakeEffects(system)
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=effects, kernel_release="6.12.0-nixos") == 0
    assert effects.systemctl_calls == []


def test_status_shows_the_pending_deferral_from_the_state_dir(system, store, trees, tmp_path, capsys):
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    assert cli(system, store, trees, tmp_path, "check", busy_grace_s=0) == 1
    capsys.readouterr()
    assert cli(system, store, trees, tmp_path, "status") == 0
    out = capsys.readouterr().out
    assert "deferred since:" in out and "pid 77 (python3) holds /dev/nvidia0" in out, out
    assert "runs by itself once the GPU is idle" in out


@pytest.mark.parametrize("key,value,why", [
    ("swap_unit", "nvidia-persistenced", "expected a unit name"),
    ("gpu_units", ["../x.service"], "expected a unit name"),
    ("busy_grace_s", -1, "expected a finite number >= 0"),
    ("lock_timeout_s", 0, "expected a finite positive number"),
])
def test_new_keys_are_validated(store, trees, key, value, why):
    with pytest.raises(ConfigError, match=f"{key}.*{why}"):
        config_for(store, trees, **{key: value})


def test_new_keys_are_read(store, trees):
    config = config_for(store, trees, swap_unit="nvidia-kmod-swap.service", gpu_units=["nvidia-powerd.service"],
                        busy_grace_s=0, lock_timeout_s=90)
    assert (config.swap_unit, config.gpu_units, config.busy_grace_s, config.lock_timeout_s) == (
        "nvidia-kmod-swap.service", ("nvidia-powerd.service",), 0.0, 90.0)
