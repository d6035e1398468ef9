"""Issue 22: the helper's seams. What changed is read from sysfs, a load with no driver before it
is never rolled back to nothing, refusals are reported once instead of looping, the rollback waits
out momentary holders as the forward path does. Each test fails on 0c4fa7d."""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from fakesys import BEFORE, FULL, NEW, OLD, Crash, FakeEffects, cli, make_config, swapper, write_driver
from nvidia_kmod_swap.config import ConfigError, parse
from nvidia_kmod_swap.devices import fix_modprobe_nodes
from nvidia_kmod_swap.state import StateDir
from nvidia_kmod_swap.swap import (
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_ROLLED_BACK,
    Terminated,
)


@pytest.fixture
def trees(store):
    return write_driver(store, OLD), write_driver(store, NEW)


def failed(system, config) -> dict | None:
    path = system.root(config.state_dir) / "failed.json"
    return json.loads(path.read_text()) if path.exists() else None


class TermAfter(FakeEffects):
    """systemd's SIGTERM (a stop job) landing while OP of NAME runs: the kernel finished it."""

    def __init__(self, system, op: str, name: str, **kw) -> None:
        super().__init__(system, **kw)
        self.term_op, self.term_name = op, name

    def unload(self, name: str) -> None:
        super().unload(name)
        if self.term_op == "unload" and name == self.term_name:
            raise Terminated("terminated by SIGTERM")

    def load(self, path: str, params: str) -> None:
        super().load(path, params)
        if self.term_op == "load" and self.term_name in path:
            raise Terminated("terminated by SIGTERM")


def test_sigterm_during_the_first_unload_is_rolled_back_not_called_untouched(system, store, trees):
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]]))
    effects = TermAfter(system, "unload", "nvidia_drm")
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE  # nvidia_drm is back: the display stays
    assert failed(system, config) is None  # a stop says nothing about the driver


def test_sigterm_after_the_first_load_of_a_load_keeps_it_and_records_nothing(system, store, trees):
    config = parse(make_config(store, [trees[1]], []))
    effects = TermAfter(system, "load", "/nvidia.ko")
    assert swapper(system, config, effects).run() == EXIT_LOAD_FAILED
    assert system.versions() == {"nvidia": NEW}
    assert failed(system, config) is None


def test_a_load_whose_verification_fails_keeps_the_driver(system, store, trees, capsys):
    """At boot (nothing loaded), nvidia-smi reports one GPU failing: the driver stays loaded, the
    unit fails loudly naming it, and a restart does not unload it (0c4fa7d: rolled back to none)."""
    config = parse(make_config(store, [trees[1]], [], verify_command=["/bin/true"]))
    effects = FakeEffects(system, command_output=(0, f"{NEW}\n{NEW}\nERR!\n"))
    assert swapper(system, config, effects).run() == EXIT_LOAD_FAILED
    assert system.versions() == FULL
    err = capsys.readouterr().err
    assert "Kept what loaded" in err and "ERR!" in err, err
    assert failed(system, config)["driver_version"] == NEW


def test_a_load_that_fails_with_no_driver_says_so_records_it_and_is_not_retried(system, store, trees, tmp_path, capsys):
    """The real 550 without a GPU: nvidia's init fails (ENODEV). 0c4fa7d said "Nothing was
    unloaded; the loaded driver keeps running", wrote no failed record, and `check` said start."""
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia.ko")): 19})
    assert cli(system, store, trees, tmp_path, "swap", effects=effects) == EXIT_LOAD_FAILED
    err = capsys.readouterr().err
    assert "No NVIDIA driver is loaded" in err and "keeps running" not in err, err
    assert system.versions() == {}
    assert cli(system, store, trees, tmp_path, "check") == 255  # refused as a repeat, not started
    assert cli(system, store, trees, tmp_path, "status") == 0
    assert "blocked" in capsys.readouterr().out


def test_the_verify_commands_answer_is_its_stdout(system, store, trees):
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]], verify_command=["/bin/true"]))
    effects = FakeEffects(system, command_output=(0, f"{NEW}\n", "WARNING: infoROM is corrupted at gpu 0000:01:00.0\n"))
    assert swapper(system, config, effects).run() == EXIT_OK
    assert system.versions() == FULL


class HolderDuringRollback(FakeEffects):
    """An exporter opens the new /dev/nvidiactl just as the new nvidia_uvm fails."""

    def load(self, path: str, params: str) -> None:
        if "nvidia-uvm" in path and NEW in path:
            self.system.hold_device(4242, "dcgm-exporter", "dcgm-exporter.service", "/dev/nvidiactl")
        super().load(path, params)


def test_the_rollback_waits_out_a_momentary_holder(system, store, trees, monkeypatch):
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]], busy_grace_s=3))
    effects = HolderDuringRollback(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    waited = []

    def sleep(seconds: float) -> None:  # the exporter closes the device while the rollback waits
        waited.append(seconds)
        if (system.base / "proc/4242").exists():
            system.release_device(4242)

    monkeypatch.setattr("nvidia_kmod_swap.swap.time.sleep", sleep)
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE and waited


def test_a_swap_killed_midway_is_recovered_once_and_not_retried(system, store, trees):
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]]))
    with pytest.raises(Crash):
        swapper(system, config, FakeEffects(system, crash_at_call=2)).run()
    assert swapper(system, config).run() == EXIT_REFUSED
    assert system.versions() == BEFORE
    assert "interrupted at unloading" in failed(system, config)["reason"]
    assert swapper(system, config).run() == EXIT_REFUSED  # the next restart does not swap again


def test_check_waits_for_a_swap_in_progress_and_skips_rather_than_start(system, store, trees, tmp_path):
    system.load_driver(OLD)
    state = system.root("/run/nvidia-kmod-swap")
    state.mkdir(parents=True, mode=0o700)
    (state / "swap.json").write_text("{}")
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        start = time.monotonic()
        assert cli(system, store, trees, tmp_path, "check", lock_timeout_s=0.5) == 1
        assert time.monotonic() - start >= 0.5
    finally:
        os.close(fd)
    assert cli(system, store, trees, tmp_path, "check", lock_timeout_s=0.5) == 0  # interrupted: recover


def deferred(system, store, trees, tmp_path, **overrides):
    """A swap deferred by a busy GPU, then the GPU released."""
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    assert cli(system, store, trees, tmp_path, "check", **overrides) == 1
    system.release_device(77)
    assert StateDir(system.root("/run/nvidia-kmod-swap")).deferred() is not None


def test_retry_deferred_reports_a_refusal_once_and_stops(system, store, trees, tmp_path, capsys):
    deferred(system, store, trees, tmp_path)
    (system.base / "proc/sys/kernel/modules_disabled").write_text("1\n")
    system.modules_disabled = True
    effects = FakeEffects(system)
    for _ in range(3):
        assert cli(system, store, trees, tmp_path, "retry-deferred", effects=effects) == 0
    assert effects.systemctl_calls == []
    assert capsys.readouterr().err.count("the timer stops retrying it") == 1


def test_retry_deferred_stops_after_a_start_that_did_not_swap(system, store, trees, tmp_path, capsys):
    """The swap unit's run refused (a missing verify command): started once, not every tick."""
    deferred(system, store, trees, tmp_path, verify_command=["/nonexistent/nvidia-smi"])
    effects = FakeEffects(system)
    for _ in range(3):
        assert cli(system, store, trees, tmp_path, "retry-deferred", effects=effects,
                   verify_command=["/nonexistent/nvidia-smi"]) == 0
    assert effects.systemctl_calls == [["start", "nvidia-persistenced.service"]]
    assert "the timer stops retrying it" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["busy_grace_s", "settle_timeout_s", "lock_timeout_s"])
def test_nan_and_infinite_timeouts_are_refused(store, trees, key):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"{key}.*finite"):
            parse(make_config(store, [trees[1]], [trees[0]], **{key: bad}))


def test_stop_units_must_be_unit_names(store, trees):
    with pytest.raises(ConfigError, match="stop_units"):
        parse(make_config(store, [trees[1]], [trees[0]], on_busy="stop-units", stop_units=["ollama"]))


def test_a_verified_swap_whose_records_cannot_be_written_still_succeeds(system, store, trees, monkeypatch):
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]]))
    real_write = StateDir.write

    def full(self, name, data):
        if name == "loaded.json":
            raise OSError(28, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(StateDir, "write", full)
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions() == FULL


def test_nvswitch_and_nvlink_nodes_follow_their_majors(tmp_path):
    """nvidia-modprobe makes /dev/nvidia-nvswitchctl, /dev/nvidia-nvswitch<N> and /dev/nvidia-nvlink
    with the dynamic majors of nvidia-nvswitch and nvidia-nvlink (nvidia-modprobe-utils.c
    nvidia_nvswitch_mknod, nvidia_nvlink_mknod); after a reload they point at the new majors."""
    from nvidia_kmod_swap.effects import SystemEffects
    from nvidia_kmod_swap.paths import Root

    root = Root(tmp_path)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/devices").write_text("Character devices:\n195 nvidia\n511 nvidia-nvswitch\n510 nvidia-nvlink\n\n"
                                           "Block devices:\n  8 sd\n")
    (tmp_path / "dev").mkdir()
    try:
        for name, minor in (("nvidia-nvswitchctl", 255), ("nvidia-nvswitch0", 0), ("nvidia-nvlink", 0)):
            os.mknod(tmp_path / "dev" / name, 0o20666, os.makedev(400, minor))
    except PermissionError:
        pytest.skip("no CAP_MKNOD here (a Nix build sandbox)")
    done = fix_modprobe_nodes(root, SystemEffects(root))
    assert sorted(d.split()[0] for d in done) == ["/dev/nvidia-nvlink", "/dev/nvidia-nvswitch0", "/dev/nvidia-nvswitchctl"]
    assert os.major(os.stat(tmp_path / "dev/nvidia-nvswitchctl").st_rdev) == 511
    assert os.minor(os.stat(tmp_path / "dev/nvidia-nvswitchctl").st_rdev) == 255
    assert os.major(os.stat(tmp_path / "dev/nvidia-nvlink").st_rdev) == 510


def test_a_kernel_rebuilt_with_the_same_release_waits_for_a_reboot(system, store, trees):
    """A kernel config or patch change keeps modDirVersion; the generation's modules are built for
    the new image, not the running one: the same release, but not the booted kernel."""
    from nvidia_kmod_swap.facts import make_plan

    system.load_driver(OLD)
    link = system.base / "run/booted-system/kernel"
    link.parent.mkdir(parents=True)
    link.symlink_to("/nix/store/aaaa-linux-6.1.0-56/bzImage")
    config = parse(make_config(store, [trees[1]], [trees[0]], kernel_image="/nix/store/bbbb-linux-6.1.0-56/bzImage"))
    plan = make_plan(system.root, config)
    assert plan.action == "defer" and plan.waits_for == "reboot", plan.reason
    assert "rebuilt" in plan.reason
    same = parse(make_config(store, [trees[1]], [trees[0]], kernel_image="/nix/store/aaaa-linux-6.1.0-56/bzImage"))
    assert make_plan(system.root, same).action == "swap"


def test_the_rollback_loads_the_old_driver_with_its_own_options(system, store, trees):
    """The new generation's modprobe.d has an option only the new driver knows; the booted
    generation's (/run/booted-system/etc/modprobe.d) is what the old driver was loaded with. The
    rollback uses the latter (0c4fa7d: the new generation's, which the old driver may reject)."""
    booted = system.base / "run/booted-system/etc/modprobe.d"
    booted.mkdir(parents=True)
    (booted / "nixos.conf").write_text("options nvidia NVreg_PreserveVideoMemoryAllocations=1\n")
    (system.base / "etc/modprobe.d").mkdir(parents=True, exist_ok=True)
    (system.base / "etc/modprobe.d/nixos.conf").write_text("options nvidia NVreg_OnlyInTheNewDriver=1\n")
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]]))
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE
    assert system.modules["nvidia"].params == "NVreg_PreserveVideoMemoryAllocations=1"


def test_records_stay_readable_by_the_helper_before_this_one(system, store, trees):
    """The state dir outlives a switch back to a generation whose helper is older (deploy-rs's
    rollback): the records keep the keys that helper knows (0c4fa7d's LoadStep has no depends)."""
    system.load_driver(OLD)
    config = parse(make_config(store, [trees[1]], [trees[0]]))
    assert swapper(system, config).run() == EXIT_OK
    known = {"name", "path", "params", "version", "srcversion"}
    for record in ("loaded.json",):
        data = json.loads((system.root(config.state_dir) / record).read_text())
        assert all(set(m) == known for m in data["modules"]), data
