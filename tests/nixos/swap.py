with subtest("a driver bump swaps the modules live and the unit starts"):
    rc, out = switch("new")
    assert rc == 0, out
    machine.wait_for_unit("nvidia-persistenced.service")
    assert set(versions().values()) == {NEW}, versions()
    # The loaded nvidia is the file of the new generation's module tree, not of the booted one.
    tree = "/run/current-system/kernel-modules/lib/modules/$(uname -r)"
    machine.succeed(
        f"test \"$(modinfo -F srcversion $(find -L {tree} -name nvidia.ko))\" = \"$(cat /sys/module/nvidia/srcversion)\""
    )
    machine.succeed("test \"$(stat -c %t:%T /dev/nvidiactl)\" = c3:ff")
    machine.fail("journalctl -k --grep 'API mismatch'")

with subtest("the loaded driver's files have a GC root (Nix's gcroots: a symlink into the store)"):
    root = "/nix/var/nix/gcroots/nvidia-kmod-swap/nvidia"
    target = machine.succeed(f"readlink {root}").strip()
    assert target == machine.succeed(f"readlink -f $(find -L {tree} -name nvidia.ko)").strip(), target

with subtest("a module loaded by name after the swap is the new driver's (kmod searches the booted tree first)"):
    machine.succeed("rmmod nvidia_uvm && modprobe nvidia_uvm")
    assert machine.succeed("cat /sys/module/nvidia_uvm/version").strip() == NEW
    machine.succeed("modprobe nvidia_peermem")
    assert machine.succeed("cat /sys/module/nvidia_peermem/version").strip() == NEW
    machine.succeed("rmmod nvidia_peermem")

with subtest("rolling the generation back swaps back"):
    rc, out = switch("base")
    assert rc == 0, out
    machine.wait_for_unit("nvidia-persistenced.service")
    assert set(versions().values()) == {OLD}, versions()
    machine.fail("journalctl -k --grep 'API mismatch'")
    machine.fail("test -e /run/modprobe.d/nvidia-kmod-swap.driver.conf")  # the booted driver again
