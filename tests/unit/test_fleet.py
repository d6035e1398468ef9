"""Issue 25: on a node of a Slurm cluster a swap drains the node first (running jobs finish, no new
one starts), runs once slurmctld shows no job there, and resumes the node after the swap verified;
a failed swap leaves it drained with its reason; a drain by another hand is never lifted; at most
max_unavailable nodes are drained by us at once, counted from slurmctld's state. slurmctld is the
FakeSlurm double (fakesys.py). Each test fails on de7c603 (no Slurm gate at all)."""

from __future__ import annotations

import os

import pytest

from fakesys import (
    BEFORE,
    FULL,
    NEW,
    OLD,
    FakeEffects,
    FakeSlurm,
    SlurmNodeState,
    cli,
    make_config,
    swapper,
    write_driver,
)
from nvidia_kmod_swap.config import ConfigError, parse
from nvidia_kmod_swap.quick import noop
from nvidia_kmod_swap.slurm import Node, admit, confirm, limit_of, parse_nodes
from nvidia_kmod_swap.swap import EXIT_DEFERRED, EXIT_OK, EXIT_ROLLED_BACK

ME = "gpu1"
SCONTROL = "/run/current-system/sw/bin/scontrol"


def slurm_config(**overrides):
    return {"node": ME, "scontrol": SCONTROL, "settle_s": 0, **overrides}


@pytest.fixture
def fleet(system, store):
    """OLD loaded, NEW the profile's; a cluster of gpu1 (us) .. gpu4, all idle, in partition gpu."""
    old_dir, new_dir = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({f"gpu{i}": SlurmNodeState() for i in range(1, 5)})
    kernel = FakeEffects(system, slurm=slurm)

    def config(**overrides):
        return parse(make_config(store, [new_dir], [old_dir], slurm=slurm_config(**overrides)))

    return system, slurm, kernel, config


def test_parse_nodes_reads_a_reason_with_spaces_and_its_user_and_time():
    text = ("NodeName=gpu1 Arch=x86_64 State=MIXED+DRAIN ThreadsPerCore=1 Partitions=gpu,debug "
            "Reason=nvidia-kmod-swap: NVIDIA driver 1 -> 2 [root@2026-12-03T21:00:01] Comment=(null)\n"
            "NodeName=gpu2 State=IDLE Partitions=gpu\n")
    nodes = parse_nodes(text)
    assert nodes["gpu1"] == Node("gpu1", ("MIXED", "DRAIN"), "nvidia-kmod-swap: NVIDIA driver 1 -> 2", "root",
                                 "2026-12-03T21:00:01", ("gpu", "debug"))
    assert nodes["gpu1"].ours and nodes["gpu1"].has_jobs and not nodes["gpu1"].failed
    assert nodes["gpu2"].reason == "" and not nodes["gpu2"].drained


def test_limit_is_a_count_or_a_percentage_of_the_partition_rounded_up():
    nodes = {f"n{i}": Node(f"n{i}", ("IDLE",), "", "", "", ("gpu",) if i < 10 else ("cpu",)) for i in range(12)}
    assert limit_of("2", nodes, None) == 2
    assert limit_of("25%", nodes, "gpu") == 3   # 2.5 of 10
    assert limit_of("1%", nodes, None) == 1     # at least one
    for bad in ("0", "-1", "150%", "x", "1.5", True):
        with pytest.raises(ConfigError):
            parse(make_config("/nix/store", ["/nix/store/a"], slurm=slurm_config(max_unavailable=bad)))


def test_admit_and_confirm_rank_drains_by_slurmctlds_time_then_name():
    def node(name, reason="", time="", states=("IDLE",)):
        return Node(name, (*states, "DRAIN") if reason else states, reason, "root" if reason else "", time, ("gpu",))

    ours = "nvidia-kmod-swap: NVIDIA driver 1 -> 2"
    nodes = {"a": node("a", ours, "2026-12-03T21:00:01"), "b": node("b")}
    assert admit(nodes, "b", 1).verdict == "wait-fleet"
    assert admit(nodes, "b", 2).verdict == "drain"
    nodes["b"] = node("b", "admin: bad fan", "2026-12-03T20:00:00", ("ALLOCATED",))
    assert admit(nodes, "b", 1).verdict == "wait-jobs"  # another hand's drain: respected, not counted
    nodes["b"] = node("b", ours, "2026-12-03T21:00:01")
    # Same second: the name decides, the same way on both nodes.
    assert confirm(nodes, "a", 1).verdict == "proceed" and confirm(nodes, "b", 1).verdict == "wait-fleet"
    nodes["b"] = node("b", ours, "2026-12-03T21:00:00")
    assert confirm(nodes, "a", 1).verdict == "wait-fleet" and confirm(nodes, "b", 1).verdict == "proceed"


def test_busy_gpu_drains_the_node_then_the_idle_node_swaps_and_is_resumed(fleet, capsys):
    system, slurm, kernel, config = fleet
    system.hold_device(77, "python3", "slurmstepd.scope")
    slurm.nodes[ME].base = "ALLOCATED"
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE and kernel.calls == []
    node = slurm.nodes[ME]
    assert node.drain and node.reason == f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}" and node.base == "ALLOCATED"
    # The job ends: Slurm shows the node drained and idle; the timer's run swaps and resumes it.
    system.release_device(77)
    slurm.nodes[ME].base = "IDLE"
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert system.versions() == FULL
    assert not slurm.nodes[ME].drain and slurm.nodes[ME].reason == ""
    err = capsys.readouterr().err
    assert f"Slurm node {ME} drained" in err and f"Slurm node {ME} resumed: NVIDIA driver {NEW} loaded and verified" in err


def test_an_idle_node_is_drained_before_the_unload_and_resumed_after(fleet):
    system, slurm, kernel, config = fleet
    seen = []
    real_unload = kernel.unload

    def unload(name):
        seen.append((name, slurm.nodes[ME].drain))
        real_unload(name)

    kernel.unload = unload
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert seen and all(drained for _, drained in seen), seen
    assert not slurm.nodes[ME].drain


def test_jobs_without_the_gpu_still_keep_the_swap_waiting(fleet):
    """slurmctld shows a job on the node (DRAINING): it may open the GPU any moment."""
    system, slurm, kernel, config = fleet
    slurm.nodes[ME].base = "MIXED"
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE and slurm.nodes[ME].drain


def test_an_admins_drain_is_left_alone_and_not_resumed(fleet, capsys):
    system, slurm, kernel, config = fleet
    slurm.drain(ME, "bad fan, ticket 42", user="alice")
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert system.versions() == FULL
    node = slurm.nodes[ME]
    assert node.drain and node.reason == "bad fan, ticket 42" and node.reason_user == "alice"
    assert not any(c[:1] == ["update"] for c in slurm.calls), slurm.calls
    err = capsys.readouterr().err
    assert "drained by another hand" in err and "not drained by nvidia-kmod-swap" in err


def test_a_failed_swap_leaves_the_node_drained_with_why(fleet, capsys):
    system, slurm, kernel, config = fleet
    kernel.fail_on.add(("load", "nvidia_uvm"))  # ENODEV, once: the rollback's load works
    assert swapper(system, config(), kernel).run() == EXIT_ROLLED_BACK
    assert system.versions() == BEFORE
    node = slurm.nodes[ME]
    assert node.drain and node.reason.startswith(f"nvidia-kmod-swap: failed {OLD} -> {NEW}: "), node.reason
    # The next run does not try the same files again, and does not resume the node.
    swapper(system, config(), kernel).run()
    assert slurm.nodes[ME].drain and slurm.nodes[ME].reason == node.reason


def test_max_unavailable_counts_the_fleets_drains_of_ours(fleet, capsys):
    system, slurm, kernel, config = fleet
    slurm.drain("gpu3", f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}")
    slurm.drain("gpu4", "admin: memory errors")  # not ours: not counted
    assert swapper(system, config(max_unavailable=1), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE and not slurm.nodes[ME].drain
    assert "maxUnavailable (1)" in capsys.readouterr().err
    assert swapper(system, config(max_unavailable="50%"), kernel).run() == EXIT_OK  # 2 of 4
    assert system.versions() == FULL and not slurm.nodes[ME].drain


def test_two_nodes_draining_in_one_moment_leave_one_drained(fleet):
    """gpu0 drains in the same second as we do, between our drain and our second look: ranked by
    slurmctld's time then name, gpu0 is first; we give our drain back and touch nothing."""
    system, slurm, kernel, config = fleet
    slurm.nodes["gpu0"] = SlurmNodeState()

    def peer(args):
        if args[:2] == ["update", f"NodeName={ME}"] and "State=DRAIN" in args:
            slurm.drain("gpu0", f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}")
            slurm.clock -= 1  # the same second as ours, which drain() takes next

    slurm.on_call = peer
    assert swapper(system, config(max_unavailable=1), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE
    assert slurm.nodes["gpu0"].drain and not slurm.nodes[ME].drain


def test_slurmctld_not_answering_keeps_the_old_driver(fleet, capsys):
    system, slurm, kernel, config = fleet
    slurm.down = True
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE and kernel.calls == []
    assert "Unable to contact slurm controller" in capsys.readouterr().err


def test_nothing_left_to_swap_gives_a_waiting_drain_back(fleet, tmp_path):
    """The deploy rolled back while the node drained: the loaded driver is the profile's again.
    The no-op path falls through while a drain of ours is recorded, and the full path resumes it."""
    system, slurm, kernel, config = fleet
    system.hold_device(77, "python3", "slurmstepd.scope")
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert slurm.nodes[ME].drain
    back = config()._replace(driver_version=OLD)
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(make_config(system.base / "nix/store", ["/nix/store/x"], driver_version=OLD,
                                           state_dir=back.state_dir, slurm=slurm_config())))
    assert noop({"config": str(path), "root": str(system.base), "command": "check", "log_target": "stderr"}) is None
    assert swapper(system, back, kernel).run() == EXIT_OK
    assert not slurm.nodes[ME].drain
    assert noop({"config": str(path), "root": str(system.base), "command": "check", "log_target": "stderr"}) == 0


def test_the_switchs_check_drains_a_busy_node_and_the_timer_waits_for_slurm(system, store, tmp_path):
    """`check` (the unit's ExecCondition, in the switch) drains; `retry-deferred` (the timer) does
    not start the swap unit while slurmctld shows a job on the node, even with the GPU closed."""
    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({ME: SlurmNodeState(base="ALLOCATED")})
    kernel = FakeEffects(system, slurm=slurm)
    system.hold_device(77, "python3", "slurmstepd.scope")
    assert cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=slurm_config()) == 1
    assert slurm.nodes[ME].drain
    system.release_device(77)  # the job closed the GPU, but Slurm still shows it on the node
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert kernel.systemctl_calls == []
    slurm.nodes[ME].base = "IDLE"
    cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config())
    assert kernel.systemctl_calls == [["start", "nvidia-persistenced.service"]]


def test_slurmds_own_nvml_hold_is_stopped_for_the_swap_once_no_job_is_left(fleet, capsys):
    """slurmd with AutoDetect=nvml keeps NVML initialised for its life (Slurm 25.05's gpu_nvml.c:
    _nvml_init once, no shutdown until fini): with the node drained and no job on it, the swap
    stops slurmd.service, swaps, and starts it again (it then detects the GPUs on the new driver)."""
    system, slurm, kernel, config = fleet
    system.hold_device(88, "slurmd", "slurmd.service")
    kernel.on_systemctl = lambda args: system.release_device(88) if args == ["stop", "slurmd.service"] else None
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert system.versions() == FULL
    assert kernel.systemctl_calls == [["stop", "slurmd.service"], ["start", "--no-block", "slurmd.service"]]
    assert not slurm.nodes[ME].drain


def test_the_check_lets_the_unit_start_when_only_slurmd_holds_the_gpu(system, store, tmp_path):
    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({ME: SlurmNodeState()})
    kernel = FakeEffects(system, slurm=slurm)
    system.hold_device(88, "slurmd", "slurmd.service")
    assert cli(system, store, trees, tmp_path, "check", effects=kernel) == 1  # no Slurm gate: deferred
    assert cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=slurm_config()) == 0
    assert slurm.nodes[ME].drain


def test_a_second_bump_while_drained_renames_the_reason(fleet):
    system, slurm, kernel, config = fleet
    slurm.drain(ME, f"nvidia-kmod-swap: NVIDIA driver {OLD} -> 1.0")
    slurm.nodes[ME].base = "ALLOCATED"
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert slurm.nodes[ME].reason == f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}"


def test_a_swap_done_meanwhile_by_another_run_is_not_marked_failed(fleet):
    """slurmd is stopped for the swap (its NVML), and meanwhile another run loaded the new driver:
    the plan made after the stop has nothing to do, and the drain is given back, not turned into
    a failure."""
    system, slurm, kernel, config = fleet
    system.hold_device(88, "slurmd", "slurmd.service")

    def stop(args):
        if args == ["stop", "slurmd.service"]:
            system.release_device(88)
            for name in ("nvidia_drm", "nvidia_uvm", "nvidia_modeset", "nvidia"):
                system.remove(name)
            system.load_driver(NEW)

    kernel.on_systemctl = stop
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert system.versions() == FULL and not any(op in ("load", "unload") for op, _ in kernel.calls)
    assert not slurm.nodes[ME].drain, slurm.nodes[ME]


def test_a_resume_slurmctld_did_not_answer_is_given_back_by_the_retry_timer(system, store, tmp_path, capsys):
    """The swap verified, and slurmctld went away just before its RESUME: the node stays drained by
    us with nothing deferred any more. The retry timer's ticks give the drain back once slurmctld
    answers and this node's slurmd has registered with it again (not while another run holds the
    lock), and the no-op path falls through until then."""
    import fcntl

    from nvidia_kmod_swap.swap import LOCK_FILE

    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({ME: SlurmNodeState(), "gpu2": SlurmNodeState()})
    kernel = FakeEffects(system, slurm=slurm)

    def controller_goes(args):
        if "State=RESUME" in args:
            slurm.down = True

    slurm.on_call = controller_goes
    assert cli(system, store, trees, tmp_path, "swap", effects=kernel, slurm=slurm_config()) == EXIT_OK
    assert system.versions() == FULL and slurm.nodes[ME].drain
    assert "could not resume Slurm node gpu1" in capsys.readouterr().err
    slurm.on_call = None
    tick = ["--root", str(system.base), "--config", str(tmp_path / "config.json"), "retry-deferred"]
    assert noop({"config": tick[3], "root": tick[1], "command": "retry-deferred", "log_target": "stderr"}) is None

    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert slurm.nodes[ME].drain  # slurmctld still down: the next tick tries again
    assert "could not read Slurm node gpu1" in capsys.readouterr().err
    slurm.down = False
    slurm.nodes[ME].base = "UNKNOWN"  # slurmctld restarted; slurmd has not registered again yet
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert slurm.nodes[ME].drain and ["update", f"NodeName={ME}", "State=RESUME"] not in slurm.calls[-2:]
    assert "stays drained until slurmd registers" in capsys.readouterr().err
    slurm.nodes[ME].base = "IDLE"
    fd = os.open(system.base / "run/nvidia-kmod-swap" / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a swap under way has the drain in hand
        assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
        assert slurm.nodes[ME].drain
    finally:
        os.close(fd)
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert not slurm.nodes[ME].drain and system.versions() == FULL
    assert "Slurm node gpu1 resumed: nothing is left to swap" in capsys.readouterr().err
    assert noop({"config": tick[3], "root": tick[1], "command": "retry-deferred", "log_target": "stderr"}) == 0


def test_after_a_slurmctld_restart_the_swap_waits_until_slurmd_registers(fleet, capsys):
    """slurmctld restarted while a swap waited for a job: until this node's slurmd registers again
    the node is UNKNOWN+DRAIN, its job not shown, so the swap still waits; then it runs."""
    system, slurm, kernel, config = fleet
    slurm.drain(ME, f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}")
    slurm.nodes[ME].base = "UNKNOWN"
    assert swapper(system, config(), kernel).run() == EXIT_DEFERRED
    assert system.versions() == BEFORE and kernel.calls == []
    assert "slurmctld has not heard from slurmd on gpu1" in capsys.readouterr().err
    slurm.nodes[ME].base = "IDLE"
    assert swapper(system, config(), kernel).run() == EXIT_OK
    assert system.versions() == FULL and not slurm.nodes[ME].drain


def test_the_retry_timer_keeps_a_swap_slurmctld_cannot_gate_and_runs_it_once_it_answers(system, store, tmp_path,
                                                                                          capsys):
    """slurmctld does not answer: the switch's check defers (the node cannot be drained). The retry
    timer's ticks keep the deferral (the swap unit's own run defers it anew, or is not started),
    and once slurmctld answers the timer drains, swaps and resumes."""
    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({ME: SlurmNodeState(), "gpu2": SlurmNodeState()})
    kernel = FakeEffects(system, slurm=slurm)

    def unit(args):  # the swap unit: its ExecCondition `check`, then `swap`
        if args[:1] == ["start"]:
            if cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=slurm_config()) == 0:
                cli(system, store, trees, tmp_path, "swap", effects=kernel, slurm=slurm_config())

    kernel.on_systemctl = unit
    slurm.down = True
    assert cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=slurm_config()) == 1
    for _ in range(2):
        assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
        assert (system.base / "run/nvidia-kmod-swap/deferred.json").exists()
    assert system.versions() == BEFORE
    assert "the timer stops retrying" not in capsys.readouterr().err
    slurm.down = False
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert system.versions() == FULL and not slurm.nodes[ME].drain
    assert not (system.base / "run/nvidia-kmod-swap/deferred.json").exists()
    journal = capsys.readouterr().err
    assert "Slurm node gpu1 drained" in journal and "Slurm node gpu1 resumed" in journal, journal


def test_the_retry_timer_keeps_a_swap_that_lost_the_fleets_race(system, store, tmp_path, capsys):
    """At the switch gpu0 is drained by us and the bound is 1: the check defers. gpu0 comes back;
    a tick finds the bound free and starts the swap unit, but gpu0 drains again in the same
    moment and ranks first, so the unit's run gives its drain back and defers. That deferral is
    the gate's, not a refusal: the next tick swaps once gpu0 is back again."""
    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({"gpu0": SlurmNodeState(), ME: SlurmNodeState()})
    kernel = FakeEffects(system, slurm=slurm)
    config = slurm_config(max_unavailable="1")
    waiting = f"nvidia-kmod-swap: NVIDIA driver {OLD} -> {NEW}"

    def unit(args):  # the swap unit: its ExecCondition `check`, then `swap`
        if args[:1] == ["start"]:
            if cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=config) == 0:
                cli(system, store, trees, tmp_path, "swap", effects=kernel, slurm=config)

    def peer(args):  # gpu0's own tick, in the same second as our drain
        if args[:2] == ["update", f"NodeName={ME}"] and "State=DRAIN" in args and not slurm.nodes["gpu0"].drain:
            slurm.drain("gpu0", waiting)
            slurm.clock -= 1

    kernel.on_systemctl = unit
    slurm.drain("gpu0", waiting)
    assert cli(system, store, trees, tmp_path, "check", effects=kernel, slurm=config) == 1
    assert not slurm.nodes[ME].drain
    slurm.nodes["gpu0"].drain = False
    slurm.on_call = peer
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=config) == 0
    assert kernel.systemctl_calls[:1] == [["start", "nvidia-persistenced.service"]]
    assert system.versions() == BEFORE and slurm.nodes["gpu0"].drain and not slurm.nodes[ME].drain
    assert (system.base / "run/nvidia-kmod-swap/deferred.json").exists()
    assert "the timer stops retrying" not in capsys.readouterr().err
    slurm.on_call = None
    slurm.nodes["gpu0"].drain = False
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=config) == 0
    assert system.versions() == FULL and not slurm.nodes[ME].drain


def test_the_retry_timer_leaves_a_failed_swaps_drain_to_an_admin_without_planning(system, store, tmp_path,
                                                                                   monkeypatch):
    """After a failed swap nothing is deferred and our drain says why: the timer's ticks neither
    resume the node nor plan every tick for it."""
    import nvidia_kmod_swap.swap as swap_mod

    trees = write_driver(store, OLD), write_driver(store, NEW)
    system.load_driver(OLD)
    slurm = FakeSlurm({ME: SlurmNodeState()})
    kernel = FakeEffects(system, slurm=slurm)
    kernel.fail_on.add(("load", "nvidia_uvm"))
    assert cli(system, store, trees, tmp_path, "swap", effects=kernel, slurm=slurm_config()) == EXIT_ROLLED_BACK
    reason = slurm.nodes[ME].reason
    assert slurm.nodes[ME].drain and reason.startswith("nvidia-kmod-swap: failed ")

    def planned(*args, **kwargs):
        raise AssertionError("the tick planned")

    monkeypatch.setattr(swap_mod, "make_plan", planned)
    calls = len(slurm.calls)
    assert cli(system, store, trees, tmp_path, "retry-deferred", effects=kernel, slurm=slurm_config()) == 0
    assert slurm.nodes[ME].drain and slurm.nodes[ME].reason == reason and len(slurm.calls) == calls
