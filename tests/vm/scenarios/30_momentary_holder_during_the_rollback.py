"""Issue 22: a failing swap rolls back while a monitoring agent has the new /dev/nvidiactl open for
a moment (2 s, opened by a udev rule on the new nvidia's add event, as an exporter reacting to
the new device would). The rollback waits it out as the forward path waits (busy_grace_s) and
ends with the old driver loaded. (On 0c4fa7d: "rollback failed: nvidia cannot be unloaded",
exit 4, the new nvidia left loaded.)"""

BOOT = {"driver": "old", "persistenced": False}
MODULES = ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")
HOLDER = r"""#!/bin/sh
# once: the first add event of nvidia after the rule was installed
mkdir /run/holder-once 2>/dev/null || exit 0
systemd-run --unit=momentary-holder.service /bin/sh -c 'exec 3<>/dev/nvidiactl; touch /run/holder-open; sleep 2'
"""


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("multi-user.target")
    machine.succeed("cat > /usr/local/bin/momentary-holder <<'EOF'\n" + HOLDER + "EOF\nchmod +x /usr/local/bin/momentary-holder")
    machine.succeed("echo 'ACTION==\"add\", SUBSYSTEM==\"module\", KERNEL==\"nvidia\", RUN+=\"/usr/local/bin/momentary-holder\"' "
                    "> /etc/udev/rules.d/99-momentary-holder.rules && udevadm control --reload")
    bed.switch_driver("uvm-fails")
    rc, out = bed.helper("swap")
    machine.succeed("test -e /run/holder-open")  # the holder did open the new driver's device
    assert rc == 3, f"expected a rollback (3), got {rc}: {out}"
    found = machine.driver_versions()
    assert found == {m: old for m in MODULES}, found
    machine.succeed("test ! -e /run/nvidia-kmod-swap/swap.json")
