# Issue 25 (tests/vm/scenarios/35_slurm_drain_swap_resume.py tells the same in the Debian bed).
HOLD = "exec 3<>/dev/nvidia0; while [ ! -e /tmp/hold-done ]; do sleep 0.2; done"


def node_state():
    line = machine.succeed("scontrol --oneliner show node machine")
    state = line.split(" State=", 1)[1].split()[0]
    reason = line.split(" Reason=", 1)[1].rsplit(" [", 1)[0] if " Reason=" in line else ""
    return state, reason


with subtest("slurmd registered: the node is idle"):
    machine.wait_for_unit("slurmctld.service")
    machine.wait_for_unit("slurmd.service")
    machine.wait_until_succeeds("scontrol --oneliner show node machine | grep -q ' State=IDLE '")

with subtest("a job holds the GPU: the switch drains the node, the old driver serves the job"):
    machine.succeed(f"sbatch -J hold --gres=gpu:1 -o /tmp/hold.out --wrap '{HOLD}'")
    machine.wait_until_succeeds('test "$(squeue -h -n hold -o %T)" = RUNNING')
    rc, out = switch("new")
    assert rc == 0, out
    state, reason = node_state()
    assert "DRAIN" in state.split("+"), state
    assert reason == f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}", reason
    assert set(versions().values()) == {OLD}, versions()

with subtest("no new job starts on the drained node"):
    machine.succeed("sbatch -J next --gres=gpu:1 -o /tmp/next.out --wrap 'cat /sys/module/nvidia/version'")
    machine.sleep(6)
    assert machine.succeed("squeue -h -n next -o %T").strip() == "PENDING"

with subtest("the job ends: the timer swaps, the node is resumed, the next job runs on the new driver"):
    machine.succeed("touch /tmp/hold-done")
    machine.wait_until_succeeds(f'test "$(cat /sys/module/nvidia/version)" = {NEW}', timeout=180)
    machine.wait_until_succeeds("test -s /tmp/next.out", timeout=120)
    state, reason = node_state()
    assert "DRAIN" not in state.split("+") and reason == "", (state, reason)
    assert machine.succeed("cat /tmp/next.out").strip() == NEW
