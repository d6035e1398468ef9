"""Issue 25: the fleet's bound, an admin's drain, and a failed swap, with a real slurmctld.
- Another node of the fleet (gpu2, which runs no slurmd here) is drained by nvidia-kmod-swap and
  maxUnavailable is 1: the switch leaves this node in service and the old driver loaded; once
  gpu2 is resumed, the timer drains this node, swaps, and resumes it.
- An admin drained this node for another reason: the swap runs (no job, none can start), and the
  admin's drain and reason stay.
- A swap whose new driver fails (nvidia-uvm's init) rolls back and leaves the node drained with a
  reason that says why; it is not resumed."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("s35", Path(__file__).with_name("35_slurm_drain_swap_resume.py"))
s35 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(s35)

BOOT = {"driver": "old", "slurm": True, "retry_timer": True}
SLURM = dict(s35.SLURM, max_unavailable="1")


def drained(state):
    return "DRAIN" in state.split("+")


def test(machine, bed):
    old, new, new_b = (bed.packages[label]["version"] for label in ("old", "new", "new-b"))
    s35.wait_slurm_ready(machine)
    other = f"nvidia-kmod-swap: NVIDIA driver {old} -> {new}"
    # gpu2 never registered (UNKNOWN), and slurmctld refuses RESUME for such a node: DOWN first,
    # as a node in the middle of its own swap may well be, then our drain (DOWN+DRAIN).
    machine.succeed("scontrol update NodeName=gpu2 State=DOWN Reason=swapping")
    machine.succeed(f"scontrol update NodeName=gpu2 State=DRAIN Reason='{other}'")

    # The bound: gpu2 is out of service for its own swap.
    rc, out = bed.switch("new", config={"slurm": SLURM})
    assert rc == 0, out
    state, reason = s35.node(machine)
    assert not drained(state), (state, reason)
    assert machine.module_version("nvidia") == old
    assert "maxUnavailable (1)" in machine.journal("-t nvidia-kmod-swap"), machine.journal("-t nvidia-kmod-swap -n 20")
    # gpu2 is back: the timer takes this node out, swaps, and gives it back.
    machine.succeed("scontrol update NodeName=gpu2 State=RESUME")
    try:
        machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {new}", timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{machine.journal('-t nvidia-kmod-swap -n 40')}") from None
    machine.wait_until_succeeds("scontrol --oneliner show node testbed | grep -vq DRAIN", timeout=60)
    journal = machine.journal("-t nvidia-kmod-swap")
    assert "Slurm node testbed drained" in journal and "Slurm node testbed resumed" in journal, journal

    # An admin's drain: left as it is, and not lifted after the swap.
    machine.succeed("scontrol update NodeName=testbed State=DRAIN Reason='bad fan, ticket 42'")
    rc, out = bed.switch("new-b", config={"slurm": SLURM})
    assert rc == 0, out
    assert machine.module_version("nvidia") == new_b
    state, reason = s35.node(machine)
    assert drained(state) and reason == "bad fan, ticket 42", (state, reason)
    assert "drained by another hand" in machine.journal("-t nvidia-kmod-swap")

    # A failed swap: rolled back, the node left drained with why.
    machine.succeed("scontrol update NodeName=testbed State=RESUME")
    bad = bed.packages["uvm-fails"]["version"]
    bed.switch("uvm-fails", config={"slurm": SLURM})
    versions = machine.driver_versions()
    assert all(versions[m] == new_b for m in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")), versions
    state, reason = s35.node(machine)
    assert drained(state) and reason.startswith(f"nvidia-kmod-swap: failed {new_b} -> {bad}: "), (state, reason)
    # The timer does not lift it either.
    import time

    time.sleep(6)
    state, reason2 = s35.node(machine)
    assert drained(state) and reason2 == reason, (state, reason2)
