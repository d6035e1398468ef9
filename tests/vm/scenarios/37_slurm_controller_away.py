"""Issue 25: slurmctld does not answer, with a real slurmctld stopped in the guest.
- Before the swap: the node cannot be drained, so the switch leaves the old driver loaded (a job
  could start meanwhile); once slurmctld is back, the retry timer drains, swaps and resumes.
- After the swap, before its resume: the node stays drained by us with nothing left to swap; the
  retry timer gives the drain back once slurmctld is back. What slurmctld shows is read with
  scontrol, what the kernel loaded from sysfs."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("s35", Path(__file__).with_name("35_slurm_drain_swap_resume.py"))
s35 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(s35)

BOOT = {"driver": "old", "slurm": True, "retry_timer": True}


def drained(state):
    return "DRAIN" in state.split("+")


def wait_resumed(machine, version):
    try:
        machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {version}", timeout=120)
        machine.wait_until_succeeds("scontrol --oneliner show node testbed | grep -q ' State=IDLE '", timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{machine.journal('-t nvidia-kmod-swap -n 40')}") from None
    # DRAIN is gone. Its reason may stay on the idle node: seen with Slurm 24.11 (trixie guest, no
    # accounting) after slurmctld's restart. Its clusteracct_storage_g_node_up, which clears the
    # reason on a RESUME, returns early without accounting (src/interfaces/accounting_storage.c);
    # 22.05's clears it first.
    state, reason = s35.node(machine)
    assert not drained(state), (state, reason, log(machine), machine.journal("-u slurmctld -n 30"))


def log(machine):
    return machine.journal("-t nvidia-kmod-swap -n 30")


def test(machine, bed):
    old, new, new_b = (bed.packages[label]["version"] for label in ("old", "new", "new-b"))
    s35.wait_slurm_ready(machine)

    # Before the swap: no drain can be asked for, so nothing is unloaded.
    machine.succeed("systemctl stop slurmctld.service")
    rc, out = bed.switch("new", config={"slurm": s35.SLURM})
    assert rc == 0, out
    assert machine.module_version("nvidia") == old, log(machine)
    assert "slurmctld could not be asked" in machine.journal("-t nvidia-kmod-swap"), log(machine)
    # The retry timer ticks every 2 s meanwhile (each scontrol takes ~9 s to give up here): it keeps
    # the deferral, and nothing is unloaded.
    ticks = machine.unit_property("nvidia-kmod-swap-retry.service", "ExecMainExitTimestampMonotonic")
    machine.wait_until_succeeds("test \"$(systemctl show -P ExecMainExitTimestampMonotonic nvidia-kmod-swap-retry.service)\""
                                f" != {ticks}", timeout=60)
    machine.succeed("sleep 3")
    assert machine.module_version("nvidia") == old, log(machine)
    machine.succeed("test -e /run/nvidia-kmod-swap/deferred.json")
    assert "the timer stops retrying" not in machine.journal("-t nvidia-kmod-swap"), log(machine)
    machine.succeed("systemctl start slurmctld.service")
    wait_resumed(machine, new)
    journal = machine.journal("-t nvidia-kmod-swap")
    assert "Slurm node testbed drained" in journal and f"Slurm node testbed resumed: NVIDIA driver {new} loaded" in journal, log(machine)

    # After the swap, before the resume: slurmctld goes away while the new driver is verified.
    verify = ["/bin/sh", "-c", "systemctl stop slurmctld.service && cat /sys/module/nvidia/version"]
    rc, out = bed.switch("new-b", config={"slurm": s35.SLURM, "verify_command": verify})
    assert rc == 0, out
    assert machine.module_version("nvidia") == new_b, log(machine)
    machine.succeed("test ! -e /run/nvidia-kmod-swap/deferred.json")
    assert "could not resume Slurm node testbed" in machine.journal("-t nvidia-kmod-swap"), log(machine)
    machine.succeed("systemctl start slurmctld.service")
    # slurmctld kept our drain across its restart (StateSaveLocation); the timer gives it back.
    wait_resumed(machine, new_b)
    assert "Slurm node testbed resumed: nothing is left to swap" in machine.journal("-t nvidia-kmod-swap"), log(machine)
