"""Issue 23: containers while a swap waits. nixpkgs' CDI generator writes its spec to its
RuntimeDirectory (/run/cdi), which systemd removes when the unit stops: the switch stops it (a new
driver changes the unit) and the gate skips its start while the swap waits, so today a container
started then gets `unresolvable CDI devices nvidia.com/gpu=all`. With the spec kept
(RuntimeDirectoryPreserve=yes) it is the loaded driver's, whose libraries match the module; after
the swap the generator runs again (the retry's GPU units, and its udev rule) for the new driver."""

BOOT = {"driver": "old", "cdi": True, "retry_timer": True}
SPEC = "/run/cdi/nvidia-container-toolkit.json"
GENERATOR = "nvidia-container-toolkit-cdi-generator.service"
CONTAINER = "cdi-run nvidia.com/gpu=all -- gpu-client"


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    # At boot the generator may run before the driver's nodes exist and fail, as on NixOS (its module
    # calls its udevadm-settle guard "terribly broken"); its udev rule runs it again once the module
    # is there. What matters here is the spec once the machine is up.
    try:
        machine.wait_until_succeeds(f"systemctl is-active {GENERATOR} && test -e {SPEC}", timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{machine.journal('-b -u ' + GENERATOR)}") from None
    print(machine.journal("-b -u " + GENERATOR))
    old_lib = f"{bed.packages['old']['path']}/lib"
    assert old_lib in machine.succeed(f"cat {SPEC}")
    assert machine.succeed(CONTAINER).strip() == f"driver {old} library {old}"

    bed.hold_gpu()
    rc, out = bed.switch("new")
    assert rc == 0, out
    assert machine.module_version("nvidia") == old
    assert bed.unit_state(GENERATOR) == "inactive"
    rc, out = machine.execute(CONTAINER)
    assert rc == 0 and out.strip() == f"driver {old} library {old}", f"a container started while the swap waits: {rc} {out}"
    assert old_lib in machine.succeed(f"cat {SPEC}")

    machine.succeed("systemctl stop cuda-job.service")
    machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {new}", timeout=120)
    machine.wait_until_succeeds(f"systemctl is-active {GENERATOR}", timeout=90)
    new_lib = f"{bed.packages['new']['path']}/lib"
    machine.wait_until_succeeds(f"grep -q {new_lib} {SPEC}", timeout=60)
    assert machine.succeed(CONTAINER).strip() == f"driver {new} library {new}"
