"""Issue 23: while the loaded module is not the profile's driver (a deferred, refused or rolled-back
swap), /run/opengl-driver points at the loaded driver's libraries, through a runtime tmpfiles rule
that systemd-tmpfiles itself applies (the real one, --root the fake tree) and keeps over
graphics.nix's rule; the swap removes it. Each test fails on a422685 (no pin at all)."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from fakesys import NEW, OLD, FakeEffects, make_config, swapper, write_config, write_driver
from nvidia_kmod_swap.cli import main
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.quick import noop
from nvidia_kmod_swap.swap import EXIT_DEFERRED, EXIT_OK, EXIT_ROLLED_BACK
from nvidia_kmod_swap.userspace import PIN_RULES, Userspace, decide, graphics_rules

LINK = "/run/opengl-driver"


def environment(store, version: str, libraries: bool = True) -> str:
    """graphics.nix's driversEnv: lib/ links to the driver's libraries (builder.sh names them .so.<version>)."""
    env = store / f"{abs(hash(version)) % 10**8:08d}-graphics-drivers-{version}"
    (env / "lib").mkdir(parents=True, exist_ok=True)
    if libraries:
        (env / "lib" / f"libnvidia-ml.so.{version}").write_text("fake\n")
    return str(env)


def tmpfiles_nix(env: str) -> str:
    """graphics-driver.conf as tmpfiles.nix renders graphics.nix's settings."""
    return f"'L+' '{LINK}' '-' '-' '-' '-' {env}\n'r' '/run/opengl-driver-32' '-' '-' '-' '-' \n"


@pytest.fixture
def machine(system, store):
    """Booted with OLD (its generation's rule in /run/booted-system/etc), switched to NEW: /etc's
    rule names NEW's environment and systemd-tmpfiles has applied it, as resetup does."""
    trees = write_driver(store, OLD), write_driver(store, NEW)
    envs = {OLD: environment(store, OLD), NEW: environment(store, NEW)}
    booted = system.root("/run/booted-system/etc/tmpfiles.d")
    booted.mkdir(parents=True)
    (booted / "graphics-driver.conf").write_text(tmpfiles_nix(envs[OLD]))
    etc = system.root("/etc/tmpfiles.d")
    etc.mkdir(parents=True)
    (etc / "graphics-driver.conf").write_text(tmpfiles_nix(envs[NEW]))
    tmpfiles(system)
    config = parse(make_config(store, [trees[1]], [trees[0]], driver_links={LINK: envs[NEW]},
                               nvidia_smi=f"{store}/nvidia-x11-{NEW}-bin/bin/nvidia-smi",
                               gc_root_dir="/nix/var/nix/gcroots/nvidia-kmod-swap"))
    return trees, envs, config


def tmpfiles(system, *args: str) -> None:
    subprocess.run(["systemd-tmpfiles", f"--root={system.base}", "--create", *args], check=True, capture_output=True)


def link(system) -> str:
    return str(system.root(LINK).readlink())


def test_graphics_rules_reads_what_tmpfiles_nix_writes():
    text = tmpfiles_nix("/nix/store/aaa-graphics-drivers") + "L+ /run/opengl-driver-32 - - - - /nix/store/b-32\n"
    assert graphics_rules(text) == (("/run/opengl-driver", "/nix/store/aaa-graphics-drivers"),
                                    ("/run/opengl-driver-32", "/nix/store/b-32"))
    assert graphics_rules("'r' '/run/opengl-driver-32' '-' '-' '-' '-' \nd /run/other - - - -\n") == ()


def test_decide_pins_only_to_an_environment_that_holds_the_loaded_version():
    this = Userspace(NEW, ((LINK, "/new"),), "/new-bin/bin/nvidia-smi", "config")
    record = Userspace(OLD, ((LINK, "/old-record"),), "/old-bin/bin/nvidia-smi", "driver record")
    booted = Userspace("", ((LINK, "/old-booted"),), None, "booted")
    assert not decide(NEW, None, this, [], lambda e, v: False).pinned
    assert not decide(NEW, NEW, this, [record], lambda e, v: True).pinned
    pin = decide(NEW, OLD, this, [record, booted], lambda e, v: (e, v) in {("/old-booted", OLD)})
    assert pin.pinned and pin.links == ((LINK, "/old-booted"),) and pin.version == OLD
    assert pin.nvidia_smi is None  # the booted tmpfiles rule names no nvidia-smi: none is claimed
    pin = decide(NEW, OLD, this, [record, booted], lambda e, v: e == "/old-record")
    assert pin.links == ((LINK, "/old-record"),) and pin.nvidia_smi == "/old-bin/bin/nvidia-smi"
    pin = decide(NEW, OLD, this, [record, booted], lambda e, v: False)
    assert not pin.pinned and "no driver environment of " + OLD in pin.problem and "libnvidia-ml.so." + OLD in pin.problem
    assert pin.rules() is None


def test_a_deferred_swap_pins_the_links_and_systemd_tmpfiles_keeps_the_pin(system, store, machine, capsys):
    trees, envs, config = machine
    system.load_driver(OLD)
    assert link(system) == envs[NEW]  # what graphics.nix's rule alone does after the switch
    system.hold_device(99, "python3", "job.service")
    assert swapper(system, config).run() == EXIT_DEFERRED
    assert link(system) == envs[OLD]
    rules = system.root(PIN_RULES).read_text()
    assert f"L+ {LINK} - - - - {envs[OLD]}\n" in rules
    # The switch's resetup, or anybody's `systemd-tmpfiles --create`: the first rule by file name wins.
    tmpfiles(system)
    assert link(system) == envs[OLD]
    err = capsys.readouterr().err
    assert f"driver links pinned to the loaded driver {OLD}" in err, err
    # While pinned, the environment is a GC root of its own (a GC of its generation keeps it).
    assert str(system.root("/nix/var/nix/gcroots/nvidia-kmod-swap-pin/opengl-driver").readlink()) == envs[OLD]
    # A second run changes nothing and says nothing new.
    assert swapper(system, config).run() == EXIT_DEFERRED
    assert "pinned" not in capsys.readouterr().err


def test_the_swap_unpins_and_the_generations_rule_applies(system, store, machine, capsys):
    trees, envs, config = machine
    system.load_driver(OLD)
    system.hold_device(99, "python3", "job.service")
    assert swapper(system, config).run() == EXIT_DEFERRED
    system.release_device(99)
    assert swapper(system, config).run() == EXIT_OK
    assert system.versions()["nvidia"] == NEW
    assert not system.root(PIN_RULES).exists()
    assert link(system) == envs[NEW]
    assert "driver links unpinned" in capsys.readouterr().err
    # The stable name of the loaded driver's tools follows the module.
    assert str(system.root("/run/nvidia-loaded-driver").readlink()) == f"{store}/nvidia-x11-{NEW}-bin"
    assert not any(system.root("/nix/var/nix/gcroots/nvidia-kmod-swap-pin").iterdir())
    # The swap noted NEW's links in its driver record, for a later pin to it, and rooted them.
    record = json.loads(system.root(f"/run/nvidia-kmod-swap/driver-{NEW}.json").read_text())
    assert record["driver_links"] == {LINK: envs[NEW]}
    assert str(system.root("/nix/var/nix/gcroots/nvidia-kmod-swap/opengl-driver").readlink()) == envs[NEW]


def test_a_rolled_back_swap_keeps_the_links_on_the_old_driver(system, store, machine):
    trees, envs, config = machine
    system.load_driver(OLD)
    new_uvm = str(next(trees[1].rglob("nvidia*uvm.ko*")))
    effects = FakeEffects(system, always_fail={("load", new_uvm): errno.ENODEV})
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions()["nvidia"] == OLD
    assert link(system) == envs[OLD]


def test_the_pin_command_during_a_switch(system, store, machine, tmp_path, capsys):
    """nvidia-kmod-swap-pin.service runs before resetup: the new rule is in /etc, the link still old."""
    trees, envs, config = machine
    system.load_driver(OLD)
    path = write_config(tmp_path / "config.json", make_config(
        store, [trees[1]], [trees[0]], driver_links={LINK: envs[NEW]}))
    argv = ["--root", str(system.base), "--config", str(path), "--log-target", "stderr"]
    assert main([*argv, "pin"], effects=FakeEffects(system)) == 0
    tmpfiles(system)  # then resetup
    assert link(system) == envs[OLD]
    status = capsys.readouterr()
    assert main([*argv, "status"]) == 0
    out = capsys.readouterr().out
    assert f"driver links:    pinned to the loaded driver {OLD}: {LINK} -> {envs[OLD]}" in out, out
    assert main([*argv, "plan", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["userspace"]
    assert info["pinned"] and info["version"] == OLD and info["pin"] == {LINK: envs[OLD]}, info
    assert status.err.count("pinned to the loaded driver") == 1


def test_no_environment_of_the_loaded_version_is_said_not_guessed(system, store, machine, tmp_path, capsys):
    trees, envs, config = machine
    (store / envs[OLD].rsplit("/", 1)[1] / "lib" / f"libnvidia-ml.so.{OLD}").unlink()
    system.load_driver(OLD)
    system.hold_device(99, "python3", "job.service")
    assert swapper(system, config).run() == EXIT_DEFERRED
    assert not system.root(PIN_RULES).exists() and link(system) == envs[NEW]
    err = capsys.readouterr().err
    assert f"no driver environment of {OLD} is known" in err and f"without libnvidia-ml.so.{OLD}" in err, err


def test_the_no_op_path_hands_a_pinned_machine_to_the_full_path(system, store, machine, tmp_path):
    trees, envs, config = machine
    system.load_driver(NEW)
    path = write_config(tmp_path / "config.json", make_config(store, [trees[1]], [trees[0]]))
    args = {"command": "swap", "config": str(path), "root": str(system.base), "log_target": "stderr"}
    assert noop(args) == 0
    system.root(PIN_RULES).parent.mkdir(parents=True, exist_ok=True)
    system.root(PIN_RULES).write_text(f"L+ {LINK} - - - - {envs[OLD]}\n")
    assert noop(args) is None  # a pin left from before the swap: the full path removes it
    assert swapper(system, config).run() == EXIT_OK
    assert not system.root(PIN_RULES).exists() and link(system) == envs[NEW]


def test_a_swap_waiting_for_a_new_kernel_pins_both_links(system, store, machine):
    """A kernel bump defers the swap to the reboot; until then both links (enable32Bit) follow
    the loaded driver."""
    trees, envs, _ = machine
    env32 = {OLD: environment(store, OLD + "-32"), NEW: environment(store, NEW + "-32")}
    for version in (OLD, NEW):  # the 32-bit environment holds the same version's libraries
        (store / env32[version].rsplit("/", 1)[1] / "lib" / f"libnvidia-ml.so.{version}").write_text("fake\n")
    for where, version in (("/run/booted-system/etc/tmpfiles.d", OLD), ("/etc/tmpfiles.d", NEW)):
        system.root(where + "/graphics-driver.conf").write_text(
            f"'L+' '{LINK}' '-' '-' '-' '-' {envs[version]}\n"
            f"'L+' '/run/opengl-driver-32' '-' '-' '-' '-' {env32[version]}\n")
    tmpfiles(system)
    config = parse(make_config(store, [trees[1]], [trees[0]], kernel_release="6.18.1",
                               driver_links={LINK: envs[NEW], "/run/opengl-driver-32": env32[NEW]}))
    system.load_driver(OLD)
    assert swapper(system, config).run() == EXIT_DEFERRED
    assert link(system) == envs[OLD]
    assert str(system.root("/run/opengl-driver-32").readlink()) == env32[OLD]
