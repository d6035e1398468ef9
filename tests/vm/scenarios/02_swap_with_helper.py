"""The same driver bump with the helper: the modules are swapped live and persistenced starts."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.module_version("nvidia") == old
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    for module in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"):
        assert machine.module_version(module) == new, (module, machine.module_version(module))
    # The kernel's holder graph is whole again.
    users = machine.loaded_modules()
    assert {"nvidia_modeset", "nvidia_uvm", "nvidia_drm"} <= set(users["nvidia"].strip(",").split(",")), users
    # Device nodes exist with the numbers the new driver registered.
    machine.assert_driver_nodes()
    # The new userspace talks to the new module; no mismatch was ever logged.
    out = machine.succeed(f"{bed.packages['new']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert out.strip() == new, out
    assert "API mismatch" not in machine.dmesg()
    # The persistence daemon holds the new driver open.
    assert int(machine.succeed("cat /sys/module/nvidia/refcnt")) > 3
    journal = machine.journal("-u nvidia-persistenced")
    assert f"NVIDIA driver {new} loaded (upgrade from {old})" in journal, journal
    assert machine.unit_property("nvidia-persistenced.service", "NRestarts") == "0"
    # The helper waited for udev's own word (pyudev's Monitor on the udev netlink source) that it had
    # processed the add events, i.e. run the mknod rules, of the modules that make nodes.
    steps = machine.succeed("journalctl SYSLOG_IDENTIFIER=nvidia-kmod-swap PRIORITY=7 --no-pager -o cat")
    assert "device nodes: udev reported its add events of nvidia, nvidia_drm, nvidia_modeset, nvidia_uvm processed" in steps, steps
    # `status` reads the last swap back from the journal (systemd.journal.Reader, by MESSAGE_ID).
    status = machine.succeed("nvidia-kmod-swap status")
    assert f"swapped ({old} -> {new})" in status and "deferred since" not in status, status
    # journald recorded where the helper decided it (journal.send's CODE_* fields, given by the helper).
    code = machine.succeed("journalctl NVIDIA_EVENT=swapped --no-pager -o json -n 1")
    assert '"CODE_FUNC":"_swap"' in code.replace(" ", "") and "nvidia_kmod_swap/swap.py" in code, code
