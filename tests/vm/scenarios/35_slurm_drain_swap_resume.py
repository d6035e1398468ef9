"""Issue 25: a GPU node of a Slurm cluster (Debian's slurmctld, slurmd and munge, this guest its
only slurmd) takes a driver bump while a job holds the GPU. The switch drains the node in Slurm
with a reason naming nvidia-kmod-swap and both versions; the job runs on, on the old driver; a new
job does not start there. The job ends: the timer stops slurmd (which holds NVML, as with
AutoDetect=nvml), swaps, starts slurmd again, resumes the node, and the job that waited runs on
the new driver. What slurmctld shows is read with scontrol and squeue, what the kernel loaded
from sysfs, who holds the GPU from /proc."""

import time

BOOT = {"driver": "old", "slurm": True, "retry_timer": True}
SLURM = {"node": "testbed", "scontrol": "/usr/bin/scontrol", "settle_s": 1}
# A job that holds the GPU, as a CUDA process does, until told to end.
HOLD = "exec 3<>/dev/nvidia0; while [ ! -e /tmp/hold-done ]; do sleep 0.2; done"


def node(machine, name="testbed"):
    """slurmctld's view of NAME: State and Reason (the reason without its [user@time])."""
    line = machine.succeed(f"scontrol --oneliner show node {name}")
    state = line.split(" State=", 1)[1].split()[0]
    reason = line.split(" Reason=", 1)[1].rsplit(" [", 1)[0] if " Reason=" in line else ""
    return state, reason


def wait_slurm_ready(machine):
    """slurmd registered with slurmctld: the node is IDLE (not UNKNOWN or NOT_RESPONDING)."""
    machine.wait_for_unit("slurmctld.service", timeout=120)
    machine.wait_for_unit("slurmd.service", timeout=120)
    machine.wait_until_succeeds("scontrol --oneliner show node testbed | grep -q ' State=IDLE '", timeout=120)


def nvml_holder(machine):
    """slurmd's NVML (testbed.py's double): a process of slurmd.service with /dev/nvidiactl open."""
    pid = machine.wait_until_succeeds("pgrep -f ^slurmd-nvml", timeout=30).split()[0]
    assert "slurmd.service" in machine.succeed(f"cat /proc/{pid}/cgroup")
    machine.wait_until_succeeds(f"ls -l /proc/{pid}/fd | grep -q /dev/nvidiactl", timeout=30)
    return pid


def job_state(machine, name):
    return machine.succeed(f"squeue -h -n {name} -o %T").strip()


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    wait_slurm_ready(machine)
    machine.succeed(f"sbatch -J hold --gres=gpu:1 -w testbed -o /tmp/hold.out --wrap '{HOLD}'")
    machine.wait_until_succeeds("test \"$(squeue -h -n hold -o %T)\" = RUNNING", timeout=60)
    machine.wait_until_succeeds("fuser /dev/nvidia0", timeout=30)
    nvml_holder(machine)

    rc, out = bed.switch("new", config={"slurm": SLURM})
    assert rc == 0, out
    state, reason = node(machine)
    assert "DRAIN" in state.split("+"), state
    assert reason == f"nvidia-kmod-swap: NVIDIA driver {old} -> {new}", reason
    assert machine.module_version("nvidia") == old
    assert job_state(machine, "hold") == "RUNNING"
    status = machine.succeed("nvidia-kmod-swap status")
    assert "slurm node:      testbed (" in status and "(drained by nvidia-kmod-swap)" in status, status
    # No new job starts on the drained node.
    machine.succeed("sbatch -J next --gres=gpu:1 -w testbed -o /tmp/next.out --wrap /usr/local/bin/gpu-client")
    time.sleep(6)
    assert job_state(machine, "next") == "PENDING", machine.succeed("squeue")
    assert machine.module_version("nvidia") == old

    machine.succeed("touch /tmp/hold-done")  # the job ends
    try:
        machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {new}", timeout=120)
        machine.wait_until_succeeds("test -s /tmp/next.out", timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{machine.journal('-t nvidia-kmod-swap -n 40')}\n{machine.succeed('squeue; sinfo')}") from None
    versions = machine.driver_versions()
    assert all(versions[m] == new for m in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")), versions
    # slurmd was stopped for the swap and runs again, its NVML on the new driver.
    assert machine.unit_property("slurmd.service", "ActiveState") == "active"
    nvml_holder(machine)
    assert "stopping slurmd.service to free the GPU" in machine.journal("-t nvidia-kmod-swap")
    state, reason = node(machine)
    assert "DRAIN" not in state.split("+") and reason == "", (state, reason)
    # The job that waited ran on the new driver, its libraries and module agreeing.
    machine.wait_until_succeeds("test -z \"$(squeue -h -n next)\"", timeout=60)
    assert machine.succeed("cat /tmp/next.out").strip() == f"driver {new} library {new}"
    journal = machine.journal("-t nvidia-kmod-swap")
    assert "Slurm node testbed drained" in journal and f"Slurm node testbed resumed: NVIDIA driver {new} loaded" in journal, journal
