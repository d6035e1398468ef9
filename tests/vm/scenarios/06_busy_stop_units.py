"""on_busy=stop-units: the listed unit holding the GPU is stopped, the swap done, the unit started again."""

BOOT = {"driver": "old", "files": {"/etc/systemd/system/cuda-job.service": (
    "[Service]\nExecStart=/bin/bash -c 'exec 3<>/dev/nvidia0; exec sleep infinity'\n")}}


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.succeed("systemctl start cuda-job.service")
    machine.wait_until_succeeds("ls -l /proc/$(systemctl show -P MainPID cuda-job.service)/fd | grep -q /dev/nvidia0")
    old_pid = machine.unit_property("cuda-job.service", "MainPID")
    bed.switch_driver("new", config={"on_busy": "stop-units", "stop_units": ["cuda-job.service"]})
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    assert set(machine.driver_versions().values()) == {new}
    machine.wait_for_unit("cuda-job.service")
    new_pid = machine.unit_property("cuda-job.service", "MainPID")
    assert new_pid != old_pid
    machine.wait_until_succeeds(f"ls -l /proc/{new_pid}/fd | grep -q /dev/nvidia0")
    machine.succeed(f"test ! -e /proc/{old_pid}")  # the old job was stopped, not left running
