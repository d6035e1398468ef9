"""Issue 10: the helper on real machines. One section per numbered rule; each test fails on the
helper before that rule (4e304b8). Fakes are as hostile as the kernel: failures persist."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest

from fakesys import BEFORE, FULL, NEW, OLD, RELEASE, FakeEffects, cli, config_for, make_config, swapper, write_config, write_driver, write_ko
from nvidia_kmod_swap.cli import main
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.facts import make_plan
from nvidia_kmod_swap.quick import try_noop
from nvidia_kmod_swap.swap import EXIT_OK, EXIT_REFUSED, EXIT_ROLLBACK_FAILED, EXIT_ROLLED_BACK

FS_VERSION = "2.28.4"  # nvidia_fs (GPUDirect Storage) has a MODULE_VERSION of its own


@pytest.fixture
def trees(store):
    return write_driver(store, OLD), write_driver(store, NEW)


def state(system, config, name="swap.json"):
    return system.root(config.state_dir) / name


# -- 1. only the driver is the driver -------------------------------------------------------------
def add_nvidia_fs(store, system, trees, loaded=True):
    """nvidia_fs built against each driver, as extraModulePackages puts it in the module tree."""
    for tree in trees:
        write_ko(tree / "extra", "nvidia_fs", FS_VERSION, depends=("nvidia",))
    if loaded:
        system.add("nvidia_fs", FS_VERSION, ("nvidia",), srcversion=f"SRCNVIDIA_FS{FS_VERSION}".upper()[:23])


def test_nvidia_fs_without_a_driver_change_is_nothing_to_do(system, store, trees, tmp_path):
    system.load_driver(NEW)
    add_nvidia_fs(store, system, trees)
    assert cli(system, store, trees, tmp_path, "check") == 0
    assert make_plan(system.root, config_for(store, trees)).action == "none"


def test_nvidia_fs_is_a_holder_reloaded_from_its_new_build(system, store, trees):
    system.load_driver(OLD)
    add_nvidia_fs(store, system, trees)
    # the two builds differ (built against different drivers), the version is nvidia_fs' own
    write_ko(trees[1] / "extra", "nvidia_fs", FS_VERSION, depends=("nvidia",))
    config = config_for(store, trees)
    plan = make_plan(system.root, config)
    assert plan.action == "swap", plan.reason
    assert plan.unload.index("nvidia_fs") < plan.unload.index("nvidia")
    assert [s.name for s in plan.load].index("nvidia_fs") > 0  # after nvidia
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions() == {**FULL, "nvidia_fs": FS_VERSION}


def test_backlight_module_is_left_alone_by_a_bump(system, store, trees):
    """nvidia_wmi_ec_backlight is in-tree (no version) and holds nothing of the driver."""
    system.load_driver(OLD)
    system.add("wmi", None, ())
    system.add("nvidia_wmi_ec_backlight", None, ("wmi",))
    config = config_for(store, trees)
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions() == {**FULL, "wmi": None, "nvidia_wmi_ec_backlight": None}


def test_fast_path_agrees_with_the_full_path_about_holders(system, store, trees, tmp_path):
    system.load_driver(NEW)
    add_nvidia_fs(store, system, trees)
    path = write_config(tmp_path / "c.json", make_config(store, [trees[1]], [trees[0]]))
    argv = ["--root", str(system.base), "--config", str(path), "check"]
    fast = try_noop(argv)
    full = make_plan(system.root, config_for(store, trees)).action
    assert fast in (None, 0) and full == "none"  # fast may hand over; it must never contradict


# -- 2. rollback converges ---------------------------------------------------------------------
def test_rollback_blocked_by_an_open_device_tears_nothing_down(system, store, trees, capsys):
    """A process opens the new /dev/nvidia0 mid-swap; the kernel answers EAGAIN to every unload."""
    system.load_driver(OLD)
    config = config_for(store, trees)
    effects = FakeEffects(system, always_fail={("load", "nvidia_drm"): errno.ENODEV})
    plain_load = effects.load

    def load(path, params):
        plain_load(path, params)
        if "nvidia.ko" in path and NEW in path:
            system.hold_device(4242, "nvidia-smi", None)

    effects.load = load
    assert swapper(system, config, effects).run() == EXIT_ROLLBACK_FAILED
    after_first = system.versions()
    assert after_first == {"nvidia": NEW, "nvidia_modeset": NEW, "nvidia_uvm": NEW}  # not torn down to nvidia
    err = capsys.readouterr().err
    assert "nvidia cannot be unloaded" in err and "Loaded now (sysfs): nvidia 570.133.07" in err
    # Every restart while the device is held: still nothing torn down.
    assert swapper(system, config, effects).run() == EXIT_ROLLBACK_FAILED
    assert system.versions() == after_first
    system.release_device(4242)
    assert swapper(system, config, FakeEffects(system)).run() == EXIT_REFUSED  # rolled back, then not retried
    assert system.versions() == BEFORE


def test_rollback_keeps_modules_already_at_the_target(system, store, trees):
    system.load_driver(OLD)
    config = config_for(store, trees)
    effects = FakeEffects(system, always_fail={("unload", "nvidia_modeset"): errno.EBUSY})
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE
    # unloaded nvidia_drm and nvidia_uvm, failed on nvidia_modeset; rollback only loads those two back
    assert effects.calls[3:] == [("load", "nvidia_uvm"), ("load", "nvidia_drm")]


FUTURE = {"format": 99, "expected_version": NEW, "loaded_version": OLD, "load": [], "rollback": [], "phase": "loading"}


@pytest.mark.parametrize("content", ["{not json", json.dumps(FUTURE), json.dumps([1, 2]),
                                     json.dumps({"format": 1, "plan": {}, "load": [], "rollback": []})])
def test_unreadable_state_file_is_refused_not_acted_on(system, store, trees, content, capsys):
    system.load_driver(OLD)
    config = config_for(store, trees)
    state(system, config).parent.mkdir(parents=True, exist_ok=True)
    state(system, config).write_text(content)
    effects = FakeEffects(system)
    assert swapper(system, config, effects).run() == EXIT_ROLLBACK_FAILED
    assert effects.calls == [] and system.versions() == BEFORE
    assert "refusing to act" in capsys.readouterr().err


# -- 3. rollback tells the truth ---------------------------------------------------------------
def test_rollback_file_must_match_version_and_srcversion(system, store, trees):
    """The loaded nvidia has 570.124.04; a stale file (loaded.json after a manual reload) has that
    module's srcversion but version 570.86.16: it is not the loaded module."""
    system.load_driver(OLD)
    stale = write_ko(store / "manual/lib/modules" / RELEASE, "nvidia", "570.86.16")
    system.change("nvidia", srcversion="SRCNVIDIA570.86.16")  # write_ko's srcversion of that file
    config = parse(make_config(store, [trees[1]], [trees[0], stale.parent]))
    plan = make_plan(system.root, config)
    assert plan.action == "refuse" and "no file of the loaded module(s) nvidia" in plan.reason


def test_rollback_reports_what_sysfs_shows(system, store, trees, capsys):
    system.load_driver(OLD)
    config = config_for(store, trees)
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-drm.ko")): errno.ENODEV})
    plain_load = effects.load

    def load(path, params):  # the old nvidia_uvm "loads" but the kernel shows another build
        plain_load(path, params)
        if OLD in path and "nvidia-uvm" in path:
            system.change("nvidia_uvm", srcversion="SOMEOTHERBUILD")

    effects.load = load
    assert swapper(system, config, effects).run() == EXIT_ROLLBACK_FAILED
    err = capsys.readouterr().err
    assert "is loaded again" not in err and "nvidia_uvm is loaded with version '570.124.04' srcversion 'SOMEOTHERBUILD'" in err, err


# -- 4. no silent skip ---------------------------------------------------------------------------
def test_latin1_bytes_in_modprobe_d_and_cmdline_are_read(system, store, trees, tmp_path):
    system.load_driver(OLD)
    (system.base / "etc/modprobe.d/legacy.conf").write_bytes(b"# r\xe9glages\noptions nvidia NVreg_X=caf\xe9\n")
    (system.base / "proc/cmdline").write_bytes(b"root=/dev/vda quiet title=\xe9t\xe9 nvidia.NVreg_Y=1\n")
    assert cli(system, store, trees, tmp_path, "check") == 0
    plan = make_plan(system.root, config_for(store, trees))
    params = {s.name: s.params for s in plan.load}
    assert params["nvidia"] == "NVreg_X=caf\udce9 NVreg_Y=1"


def test_unexpected_errors_exit_255_never_1(system, store, trees, tmp_path, monkeypatch, capsys):
    system.load_driver(OLD)
    (system.root("/run/nvidia-kmod-swap")).mkdir(parents=True)
    (system.root("/run/nvidia-kmod-swap/failed.json")).write_text("[]")
    assert cli(system, store, trees, tmp_path, "check") == 255
    assert "failed.json" in capsys.readouterr().err
    (system.root("/run/nvidia-kmod-swap/failed.json")).unlink()
    monkeypatch.setattr("nvidia_kmod_swap.facts.make_plan", lambda *a, **k: 1 / 0)
    assert cli(system, store, trees, tmp_path, "check") == 255
    assert "ZeroDivisionError" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["symlink", "file", "full"])
def test_unusable_state_dir_is_a_clear_refusal(system, store, trees, tmp_path, kind, monkeypatch, capsys):
    system.load_driver(OLD)
    run = system.root("/run")
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (run / "nvidia-kmod-swap").symlink_to(tmp_path / "elsewhere")
    elif kind == "file":
        (run / "nvidia-kmod-swap").write_text("")
    else:
        real_open = os.open

        def full_open(path, flags, *args, **kwargs):
            if str(path).endswith((".swap.json.tmp", ".loaded.json.tmp")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", full_open)
    effects = FakeEffects(system)
    assert cli(system, store, trees, tmp_path, "swap", effects=effects) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("nothing was touched" in err or "nothing touched" in err), err
    assert effects.calls == [] and system.versions() == BEFORE


# -- 5. state writes during a rollback are best effort -----------------------------------------
def test_run_full_mid_swap_still_rolls_back(system, store, trees, monkeypatch):
    system.load_driver(OLD)
    config = config_for(store, trees)
    real_open, writes = os.open, []

    def filling_open(path, flags, *args, **kwargs):
        if str(path).endswith(".swap.json.tmp"):
            writes.append(path)
            if len(writes) >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", filling_open)
    assert swapper(system, config).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE


# -- 6. stop-units -------------------------------------------------------------------------------
@pytest.fixture
def busy(system, store, trees):
    system.load_driver(OLD)
    system.hold_device(77, "python3", "train.service")
    return config_for(store, trees, on_busy="stop-units", stop_units=["train.service"])


def test_units_stopped_before_a_crash_are_started_by_the_next_run(system, busy):
    from fakesys import Crash

    def stop_then_die(args):
        if args[0] == "stop":
            system.release_device(77)
            raise Crash("SIGKILL right after systemctl stop")

    with pytest.raises(Crash):
        swapper(system, busy, FakeEffects(system, on_systemctl=stop_then_die)).run()
    recorded = json.loads(state(system, busy).read_text())
    assert recorded["stopped_units"] == ["train.service"]
    effects = FakeEffects(system)
    assert swapper(system, busy, effects).run() == EXIT_OK
    assert ["start", "--no-block", "train.service"] in effects.systemctl_calls


def test_sigterm_mid_swap_rolls_back_and_starts_the_units(system, busy):
    def stop(args):
        if args[0] == "stop":
            system.release_device(77)

    effects = FakeEffects(system, on_systemctl=stop)
    plain_load = effects.load

    def load(path, params):
        plain_load(path, params)
        if "nvidia-modeset" in path and NEW in path:
            os.kill(os.getpid(), signal.SIGTERM)  # systemd's start timeout

    effects.load = load
    assert swapper(system, busy, effects).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE
    assert effects.systemctl_calls[-1] == ["start", "--no-block", "train.service"]


# -- 7. locked kernels -------------------------------------------------------------------------
def test_modules_disabled_is_refused_before_planning(system, store, trees, tmp_path, capsys):
    system.load_driver(OLD)
    system.modules_disabled = True
    system.sync()
    assert cli(system, store, trees, tmp_path, "check") == 255
    assert "modules_disabled" in capsys.readouterr().err
    effects = FakeEffects(system)
    assert cli(system, store, trees, tmp_path, "swap", effects=effects) == EXIT_REFUSED
    assert effects.calls == []


def test_first_unload_failure_changed_nothing_and_needs_no_rollback(system, store, trees, capsys):
    system.load_driver(OLD)
    config = config_for(store, trees)
    effects = FakeEffects(system, always_fail={("unload", "nvidia_drm"): errno.EPERM})
    assert swapper(system, config, effects).run() == EXIT_REFUSED
    assert effects.calls == [("unload", "nvidia_drm")] and system.versions() == BEFORE
    assert "Nothing was unloaded" in capsys.readouterr().err
    assert not state(system, config, "failed.json").exists() and not state(system, config).exists()


# -- 8. parameters -------------------------------------------------------------------------------
def test_cmdline_quotes_follow_the_kernel_not_shell():
    from nvidia_kmod_swap.params import parse_cmdline

    line = "BOOT_IMAGE=/k foo=it's nvidia.NVreg_Y=1 bar=x'y nvidia.NVreg_Z=\"a b\" \"nvidia-drm.modeset=1\" nvidia.flag"
    assert parse_cmdline(line) == [("nvidia", "NVreg_Y=1"), ("nvidia", 'NVreg_Z="a b"'), ("nvidia_drm", "modeset=1")]


def test_hash_inside_an_options_value_is_kept():
    from nvidia_kmod_swap.params import parse_modprobe_conf

    assert parse_modprobe_conf("options nvidia NVreg_RegistryDwords=a#b\n# options nvidia X=1\n") == [
        ("nvidia", "NVreg_RegistryDwords=a#b")]


def test_proc_modules_users_column_as_the_kernel_prints_it():
    """kernel/module/procfs.c print_unload_info: "a,b,", "-" for none, "[permanent]," for a module
    that cannot be unloaded; none of those is a module name."""
    from nvidia_kmod_swap.rules import parse_proc_modules

    rows = parse_proc_modules("nvidia 100 2 nvidia_uvm,nvidia_modeset, Live 0x0\nfoo 10 0 - Live 0x0\n"
                              "bar 10 0 [permanent], Live 0x0\n")
    assert {n: u for n, (_, u) in rows.items()} == {
        "nvidia": frozenset({"nvidia_uvm", "nvidia_modeset"}), "foo": frozenset(), "bar": frozenset()}


# -- 9. the fast path shares the validator -------------------------------------------------------
def test_fast_path_does_not_pass_a_config_the_full_path_refuses(system, store, trees, tmp_path):
    system.load_driver(NEW)
    path = write_config(tmp_path / "c.json", make_config(store, [trees[1]], [trees[0]], on_busy="kill"))
    argv = ["--root", str(system.base), "--config", str(path), "--log-target", "stderr", "check"]
    assert try_noop(argv) is None
    assert main(argv) == 255


# -- 10. two files for one module ----------------------------------------------------------------
def test_two_different_files_for_one_module_are_refused_naming_both(system, store, trees):
    system.load_driver(OLD)
    other = write_ko(trees[1] / "kernel/drivers/video", "nvidia", "570.133.01")
    plan = make_plan(system.root, config_for(store, trees))
    assert plan.action == "refuse"
    assert str(other) in plan.reason and str(trees[1] / "misc/nvidia.ko") in plan.reason
    assert plan.reason.count("more than one file for nvidia") == 1


def test_two_identical_files_for_one_module_are_fine(system, store, trees):
    system.load_driver(OLD)
    (trees[1] / "updates").mkdir()
    (trees[1] / "updates/nvidia.ko").write_bytes((trees[1] / "misc/nvidia.ko").read_bytes())
    assert make_plan(system.root, config_for(store, trees)).action == "swap"


# -- 12. the loaded driver stays on disk -------------------------------------------------------
def test_gc_roots_follow_the_loaded_driver(system, store, trees):
    system.load_driver(OLD)
    gc = "/nix/var/nix/gcroots/nvidia-kmod-swap"
    config = config_for(store, trees, gc_root_dir=gc)  # the fake store is the allowed prefix
    assert swapper(system, config).run() == EXIT_OK
    links = {p.name: os.readlink(p) for p in system.root(gc).iterdir()}
    assert set(links) == set(FULL)
    assert all(t.startswith(str(store)) and NEW in t for t in links.values())
    # a failed swap back to OLD rolls back: the roots follow what is loaded (NEW again)
    config = config_for(store, (trees[1], trees[0]), gc_root_dir=gc, driver_version=OLD)
    bad = {("load", str(trees[0] / "misc/nvidia-drm.ko")): errno.ENODEV}
    assert swapper(system, config, FakeEffects(system, always_fail=bad)).run() == EXIT_ROLLED_BACK
    assert {p.name: os.readlink(p) for p in system.root(gc).iterdir()} == links


# -- 13. messages --------------------------------------------------------------------------------
def test_messages_quote_values_and_name_missing_dirs(system, store, trees):
    system.load_driver(OLD)
    write_ko(trees[1] / "misc", "nvidia", NEW + "\n")
    plan = make_plan(system.root, config_for(store, trees))
    assert "'570.133.07\\n'" in plan.reason
    missing = str(store / "nowhere")
    plan = make_plan(system.root, parse(make_config(store, [missing], [trees[0]])))
    assert f"{missing} (missing)" in plan.reason


def test_truncated_module_file_error_is_plain(system, store, trees):
    system.load_driver(OLD)
    path = trees[1] / "misc/nvidia.ko"
    path.write_bytes(path.read_bytes()[:70])
    plan = make_plan(system.root, config_for(store, trees))
    assert plan.action == "refuse" and "unpack" not in plan.reason and "truncated or corrupt" in plan.reason


def test_verify_command_is_checked_before_anything_is_unloaded(system, store, trees, capsys):
    system.load_driver(OLD)
    config = config_for(store, trees, verify_command=["/nonexistent/nvidia-smi"])
    effects = FakeEffects(system)
    assert swapper(system, config, effects).run() == EXIT_REFUSED
    assert effects.calls == [] and "does not exist" in capsys.readouterr().err
