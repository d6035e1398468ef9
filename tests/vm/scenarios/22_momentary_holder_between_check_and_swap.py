"""Issue 11 §6: a check/swap race. Right after `check` found the GPU idle, an NVML client opens
/dev/nvidiactl for five seconds (a CDI generator, a monitoring agent: long enough that `swap`, whose
start takes a second or two under emulation, finds it). `swap` must wait for it, within
busy_grace_s (10 here), and swap: the unit does not fail."""

BOOT = {"driver": "old"}

# Runs after the helper's own ExecCondition (a drop-in's ExecCondition= is appended to the unit's).
DROP_IN = """[Service]
ExecCondition=/bin/sh -c 'systemd-run --remain-after-exit --unit=nvml-blip.service /bin/sh -c "exec 3<>/dev/nvidiactl; sleep 5" && sleep 0.5'
"""


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.succeed("mkdir -p /run/systemd/system/nvidia-persistenced.service.d && cat > "
                    "/run/systemd/system/nvidia-persistenced.service.d/blip.conf <<'EOF'\n" + DROP_IN + "EOF")
    bed.switch_driver("new", config={"busy_grace_s": 10})
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.unit_property("nvidia-persistenced.service", "Result") == "success"
    assert machine.module_version("nvidia") == new
    # The blip really held the device while `swap` ran: it started before the swap and exited after.
    blip_start = int(machine.unit_property("nvml-blip.service", "ExecMainStartTimestampMonotonic"))
    blip_end = int(machine.unit_property("nvml-blip.service", "ExecMainExitTimestampMonotonic"))
    journal = machine.succeed("journalctl -u nvidia-persistenced -o short-monotonic --no-pager")
    swapped = [line for line in journal.splitlines() if f"NVIDIA driver {new} loaded" in line]
    assert swapped, journal[-2000:]
    swapped_at = float(swapped[-1].split("]")[0].strip("[ ")) * 1e6
    assert blip_start < blip_end < swapped_at, (blip_start, blip_end, swapped_at)
