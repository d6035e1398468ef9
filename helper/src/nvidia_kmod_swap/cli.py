"""nvidia-kmod-swap: swap the loaded NVIDIA kernel modules for the driver in the system profile.

Run by systemd before nvidia-persistenced starts:
  ExecCondition=+nvidia-kmod-swap --config FILE check
  ExecStartPre=+nvidia-kmod-swap --config FILE swap
and by a timer while a swap is deferred:
  nvidia-kmod-swap --config FILE retry-deferred
"""

from __future__ import annotations

import sys

from .quick import STATE_FILE, noop, parse_unit_argv
from .rules import LOG_TARGETS

TYPE_CHECKING = False  # mypy's always_true: annotations only, the no-op path imports no typing
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from .config import Config
    from .effects import Effects
    from .fleet import SlurmGate
    from .journal import Reporter
    from .paths import Root

EXIT_CONFIG = 255
EXIT_BROKEN = 255  # an unexpected error: never 1, which would make ExecCondition= skip the unit
EPILOG = """\
exit codes:
  check   0 start the unit (nothing to do, or a swap can run), 1 skip it (deferred: GPU busy
          under on_busy=defer, or a new kernel awaits a reboot), 255 refused or broken config
  swap    0 swapped, loaded or nothing to do; 1 refused (nothing touched); 3 failed and rolled
          back (the old driver is loaded); 4 rollback failed too; 75 deferred; 255 broken config
  retry-deferred
          0 nothing deferred, still busy, or the deferred swap was started; 1 starting the
          swap unit failed; 255 broken config
  pin     0 the driver links follow the loaded driver (or there is nothing to pin: said in the
          journal); 1 refused (the lock); 255 broken config

While the loaded driver is not the profile's (a deferred, refused or rolled-back swap),
/run/opengl-driver points at the loaded driver's libraries (a runtime rule in
/run/tmpfiles.d/00-nvidia-kmod-swap-pin.conf) and /run/nvidia-loaded-driver/bin/nvidia-smi is the
nvidia-smi that matches it; the swap and a reboot undo both. `status` says what is pinned and why.

A process that holds /dev/nvidia* for a moment (NVML, nvidia-smi) is waited for up to
busy_grace_s before a swap is deferred. A deferred swap is recorded in the state directory;
`retry-deferred` starts the swap unit once the GPU is idle, then the GPU units again.

Every decision goes to the journal (journalctl -u nvidia-persistenced, or
SYSLOG_IDENTIFIER=nvidia-kmod-swap) with its reason, versions, modules and GPU holders.
"""


def _parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    from . import config as config_mod

    parser = argparse.ArgumentParser(
        prog="nvidia-kmod-swap", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"JSON config written by the NixOS module (default: {config_mod.DEFAULT_PATH} under --root)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="prefix for /proc, /sys, /dev, /run, /etc and the state dir (tests, tools)")
    parser.add_argument("--log-target", choices=LOG_TARGETS, default="auto",
                        help="where messages go (default: the journal when it is there, else stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="what is loaded, what is expected, who holds the GPU (read-only)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    plan = sub.add_parser("plan", help="what `swap` would do now, and why (read-only)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", help="for ExecCondition=: should the unit start? (see exit codes)")
    swap = sub.add_parser("swap", help="for ExecStartPre=: swap or load the modules; roll back on failure")
    swap.add_argument("--retry", action="store_true",
                      help="retry a swap that failed before with the same files (not retried otherwise)")
    sub.add_parser("retry-deferred", help="for a timer: finish a deferred swap once the GPU is idle (starts the "
                   "swap unit, then the GPU units)")
    facts = sub.add_parser("facts", help="for a build: print the facts (version, vermagic, depends, ...) of the "
                           "driver's module files in DIRs as JSON, so that activation reads none")
    facts.add_argument("dirs", nargs="*", metavar="DIR", help="module trees: their nvidia* modules and dependencies")
    facts.add_argument("--every", action="append", default=[], metavar="DIR",
                       help="a module tree whose every module is included (extra module packages)")
    sub.add_parser("pin", help="for the switch, before systemd-tmpfiles-resetup: point /run/opengl-driver(-32) at "
                   "the loaded driver's libraries while it is not the profile's (undone by the swap and at reboot)")
    return parser


def _unit_args(unit_argv: dict[str, str]) -> Any:
    """The namespace argparse would make of a unit's command line (quick.parse_unit_argv)."""
    from pathlib import Path
    from types import SimpleNamespace

    return SimpleNamespace(command=unit_argv["command"], root=Path(unit_argv["root"]),
                           config=Path(unit_argv["config"]) if unit_argv["config"] else None,
                           log_target=unit_argv["log_target"], retry=False, json=False)


def main(argv: list[str] | None = None, effects: Effects | None = None) -> int:
    unit_argv = parse_unit_argv(sys.argv[1:] if argv is None else argv)
    # Versions match (every start of nvidia-persistenced): answer before importing the rest.
    code = noop(unit_argv) if unit_argv is not None else None
    if code is not None:
        return code
    from . import config as config_mod
    from .journal import Reporter
    from .paths import Root

    args = _unit_args(unit_argv) if unit_argv is not None else _parser().parse_args(argv)
    if args.command == "facts":
        return _facts(args.dirs, args.every)
    root = Root(args.root)

    reporter = Reporter("stderr" if args.log_target == "stderr" else args.log_target)
    try:
        config = config_mod.load(args.config or root(config_mod.DEFAULT_PATH))
    except config_mod.ConfigError as e:
        reporter.event("refused", str(e), "err", reason=str(e))
        return EXIT_CONFIG
    from .facts import keep_facts, learn_facts

    learn_facts(root, config)
    try:
        if args.command == "check":
            return _check(root, config, reporter, effects)
        if args.command == "swap":
            return _swap(root, config, reporter, effects, args.retry)
        if args.command == "plan":
            return _plan(root, config, args.json)
        if args.command == "retry-deferred":
            return _retry_deferred(root, config, reporter, effects)
        if args.command == "pin":
            return _pin(root, config, reporter, effects)
        return _status(root, config, args.json)
    except Exception as e:  # a bug or a system we did not expect: say so, and never exit 1 (= skip)
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        reason = f"{type(e).__name__}: {e} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        reporter.event("refused", f"{args.command} failed unexpectedly: {reason}", "crit", reason=reason)
        return EXIT_BROKEN
    finally:
        if args.command in ("check", "swap", "retry-deferred"):
            keep_facts(root, config)  # what this run read of store files, for the next run of this bump


def _facts(dirs: list[str], every: list[str]) -> int:
    import json

    from .facts import module_facts

    json.dump(module_facts(dirs, every), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _pending(root: Root, config: Config) -> bool:
    import os

    return os.path.lexists(root(config.state_dir) / STATE_FILE)


def _swap_running(root: Root, config: Config) -> bool:
    """Whether another run holds the swap lock after waiting up to lock_timeout_s for it: a swap
    in progress, which a unit starting now must not run against (a half-loaded driver), unlike an
    interrupted one (swap.json with the lock free), which `swap` recovers first."""
    import fcntl
    import os

    from .swap import LOCK_FILE, lock_within

    try:
        fd = os.open(root(config.state_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # no run has ever taken it
    try:
        return not lock_within(fd, fcntl.LOCK_SH, config.lock_timeout_s)
    finally:
        os.close(fd)


def _live_effects(root: Root, effects: Effects | None) -> Effects | None:
    """The live system's effects, or the tests' (a --root other than / gets none)."""
    if effects is None and root.is_live:
        from .effects import SystemEffects

        return SystemEffects(root)
    return effects


def _slurm_gate(root: Root, config: Config, reporter: Reporter, effects: Effects | None) -> SlurmGate | None:
    if config.slurm is None:
        return None
    effects = _live_effects(root, effects)
    if effects is None:
        return None
    from .fleet import SlurmGate
    from .state import StateDir

    state = StateDir(root(config.state_dir))
    state.ensure()
    return SlurmGate(config.slurm, effects, reporter, state)


def _check(root: Root, config: Config, reporter: Reporter, effects: Effects | None = None) -> int:
    from .facts import make_plan
    from .plan import DEFER, LOAD, NONE, REFUSE, SWAP
    from .state import StateDir, StateError
    from .swap import deferral, plan_after_grace, report

    if _swap_running(root, config):
        reporter.event("step", f"another nvidia-kmod-swap run still holds the lock in {root(config.state_dir)} after "
                       f"{config.lock_timeout_s:.0f}s: a swap is in progress, not starting", "warning")
        return 1
    if _pending(root, config):
        return 0  # an interrupted swap: `swap` recovers it first
    try:
        plan = plan_after_grace(root, config, make_plan(root, config))
    except StateError as e:
        reporter.event("refused", f"refused: {e}", "err", reason=str(e))
        return 255
    gate = _slurm_gate(root, config, reporter, effects) if plan.waits_for == "idle" or plan.changes_kernel else None
    fleet: dict[str, str] = {}
    if gate is not None:
        # On a Slurm node the switch's check drains it (fleet.py): a swap runs only drained and
        # without a job, and a busy GPU's jobs end while no new one starts.
        held = gate.hold(plan.loaded_version, plan.expected_version)
        fleet["fleet"] = held.why
        if plan.action in (LOAD, SWAP) and not held.proceed:
            plan = plan._replace(action=DEFER, reason=held.why, waits_for="idle")
        elif plan.action == DEFER and not held.proceed:
            plan = plan._replace(reason=f"{held.why}; and {plan.reason}")
        elif plan.action == DEFER and held.proceed:
            from .fleet import gated

            # Drained without a job: what still holds the GPU may be Slurm's own (slurmd's NVML),
            # which the swap stops and starts again.
            plan = plan_after_grace(root, gated(config), make_plan(root, gated(config)))
    if plan.action == DEFER:
        retry = " (retried when the GPU is idle)" if plan.waits_for == "idle" else ""
        return report(reporter, deferral(StateDir(root(config.state_dir)), plan, 1,
                                         f"deferred, not starting{retry}: {plan.reason}",
                                         loaded_version=plan.loaded_version, expected_version=plan.expected_version,
                                         **fleet))
    if plan.action == NONE and config.slurm is not None:
        settled = _slurm_gate(root, config, reporter, effects)
        if settled is not None:
            settled.settle()  # a drain of ours left from a swap that is no longer needed
    if plan.action == REFUSE:
        reporter.event("refused", f"refused: {plan.reason}", "err", reason=plan.reason,
                       loaded_version=plan.loaded_version, expected_version=plan.expected_version)
        return 255
    return 0


def _swap(root: Root, config: Config, reporter: Reporter, effects: Effects | None, retry: bool = False) -> int:
    return _swapper(root, config, reporter, effects, "swap", retry)


def _pin(root: Root, config: Config, reporter: Reporter, effects: Effects | None) -> int:
    return _swapper(root, config, reporter, effects, "pin")


def _swapper(root: Root, config: Config, reporter: Reporter, effects: Effects | None, command: str,
             retry: bool = False) -> int:
    """`swap`, `pin` or the timer's settle-drain through a Swapper: the live system's effects (a
    --root other than / changes nothing: tests pass fake effects), a refusal reported once."""
    from .state import StateError
    from .swap import EXIT_REFUSED, Refused, Swapper

    if effects is None:
        if not root.is_live:
            reporter.event("refused", f"{command} with --root {root.base} changes nothing; tests pass fake effects",
                           "err")
            return EXIT_REFUSED
        from .effects import SystemEffects

        effects = SystemEffects(root)
    try:
        swapper = Swapper(root, config, effects, reporter, retry=retry)
        match command:
            case "pin":
                return swapper.pin()
            case "settle-drain":
                return swapper.settle_drain()
        return swapper.run()
    except (Refused, StateError) as e:
        reporter.event("refused", f"refused: {e}", "err", reason=str(e))
        return EXIT_REFUSED


def _retry_deferred(root: Root, config: Config, reporter: Reporter, effects: Effects | None) -> int:
    """A deferred swap waiting for an idle GPU: once no process holds /dev/nvidia*, start the unit
    that swaps (its `check` and `swap` decide again), then the GPU units ordered after it. With
    nothing deferred, a Slurm drain of ours that outlived its swap is given back."""
    import time

    from .facts import make_plan
    from .holders import find_holders
    from .plan import DEFER, DROP, NONE, START, deferral_step
    from .rules import SLURM_DRAIN
    from .snapshot import read_snapshot
    from .state import DEFERRED_RECORD, StateDir

    state = StateDir(root(config.state_dir))
    record = state.deferred()
    if record is None:
        if config.slurm is not None and state.exists(SLURM_DRAIN) and (effects is not None or root.is_live):
            # A drain of ours whose resume failed (slurmctld did not answer) is given back once it can be.
            return _swapper(root, config, reporter, effects, "settle-drain")
        return 0
    holders = find_holders(root) if record.waits_for == "idle" else []
    busy = bool(holders)
    gate = _slurm_gate(root, config, reporter, effects) if record.waits_for == "idle" else None
    if gate is not None:
        from .fleet import gated

        # Slurm jobs still on the node, or the fleet's bound reached: the next tick asks again. No
        # job left: Slurm's own units holding the GPU (slurmd's NVML) are the swap's to stop.
        config = gated(config)
        busy = any(h.unit not in config.stop_units for h in holders) or not gate.ready().proceed
    plan = make_plan(root, config) if record.waits_for == "idle" and not busy else None
    step = deferral_step(record.waits_for, busy, plan)
    if step == DROP and plan is not None:
        state.remove(DEFERRED_RECORD)
        if plan.action != NONE:
            # Reported once: the record is gone, so the next tick does nothing.
            reporter.event("refused", f"the deferred swap to {config.driver_version} cannot run now: {plan.reason}; "
                           "the timer stops retrying it", "err", reason=plan.reason,
                           expected_version=config.driver_version, loaded_version=plan.loaded_version)
        return 0
    if step != START or plan is None:
        return 0
    if effects is None:
        if not root.is_live:
            return 0
        from .effects import SystemEffects

        effects = SystemEffects(root)
    from .effects import EffectError

    waited = time.time() - record.since
    reporter.event("retry", f"the GPU is idle: finishing the swap to {config.driver_version} deferred {waited:.0f}s "
                   f"ago ({record.reason}); starting {config.swap_unit}", "notice",
                   expected_version=config.driver_version, loaded_version=plan.loaded_version)
    start_error = None
    before = state.written(DEFERRED_RECORD)
    try:
        effects.systemctl(["start", config.swap_unit])
    except EffectError as e:
        start_error = str(e)  # the unit failed: its own run said why in the journal
    loaded = read_snapshot(root).version("nvidia")
    if loaded != config.driver_version:
        if state.written(DEFERRED_RECORD) not in (None, before):
            return 0  # the swap unit's run deferred it anew (busy again, or Slurm's gate): the next tick asks
        after = make_plan(root, config)
        if after.action == DEFER and after.waits_for == "idle":
            return 0  # busy again
        # Refused or rolled back (the swap unit's run said why): starting it again every tick would
        # repeat that, so the deferral ends here.
        state.remove(DEFERRED_RECORD)
        why = f"{start_error}; " if start_error else ""
        reporter.event("refused", f"the deferred swap to {config.driver_version} was tried and did not complete "
                       f"({why}{after.reason}); the timer stops retrying it", "err", reason=after.reason,
                       expected_version=config.driver_version, loaded_version=loaded)
        return 1 if start_error else 0
    if start_error:
        reporter.event("failed", f"starting {config.swap_unit} failed after the swap to {config.driver_version}: "
                       f"{start_error}", "err", reason=start_error)
        return 1
    state.remove(DEFERRED_RECORD)
    if config.gpu_units:
        # They were skipped while the swap was deferred, and GPU state they set (power limits, MIG,
        # fabric manager) went with the old driver: run them again.
        try:
            effects.systemctl(["restart", "--no-block", *config.gpu_units])
        except EffectError as e:
            reporter.event("failed", f"could not start the GPU units again: {e}", "err", reason=str(e))
            return 1
        reporter.event("step", f"started {', '.join(config.gpu_units)} again after the deferred swap", "notice")
    return 0


def _userspace(root: Root, config: Config) -> dict[str, Any]:
    """What `status` and `plan` say of the driver links: what they show, whether they are pinned,
    to which version and why, and the nvidia-smi that matches the loaded module."""
    import os

    from . import userspace

    pin = userspace.current(root, config)
    return {"pinned": os.path.lexists(root(userspace.PIN_RULES)), "should_pin": pin.pinned, "version": pin.version,
            "links": userspace.shown(root), "pin": dict(pin.links), "nvidia_smi": pin.nvidia_smi,
            "reason": pin.reason, "problem": pin.problem or None}


def _print_userspace(info: dict[str, Any]) -> None:
    links = ", ".join(f"{k} -> {v}" for k, v in info["links"].items() if v) or "none"
    if info["pinned"]:
        print(f"driver links:    pinned to the loaded driver {info['version']}: {links}")
    else:
        print(f"driver links:    this generation's: {links}")
    if info["pinned"] != info["should_pin"] or info["problem"]:
        print(f"                 {'should be pinned' if info['should_pin'] else 'not pinnable'}: {info['reason']}")
    elif info["pinned"]:
        print(f"                 why: {info['reason']}")
    if info["nvidia_smi"]:
        print(f"nvidia-smi:      {info['nvidia_smi']} (matches the loaded module; also "
              "/run/nvidia-loaded-driver/bin/nvidia-smi)")


def _plan(root: Root, config: Config, as_json: bool) -> int:
    import json

    from .facts import make_plan

    plan = make_plan(root, config)
    if as_json:
        print(json.dumps({**plan.to_json(), "userspace": _userspace(root, config)}, indent=2))
        return 0
    print(f"action: {plan.action}\nreason: {plan.reason}")
    if plan.unload:
        print("unload: " + " ".join(plan.unload))
    for step in plan.load:
        print(f"load:   {step.name} {step.path} {step.params}".rstrip())
    for step in plan.rollback:
        print(f"rollback: {step.name} {step.path} {step.params}".rstrip())
    for holder in plan.holders:
        print(f"holder: {holder.describe()}")
    if plan.stop_units:
        print("stop:   " + " ".join(plan.stop_units))
    for note in plan.notes:
        print(f"note:   {note}")
    _print_userspace(_userspace(root, config))
    return 0


def _slurm_node(root: Root, config: Config) -> dict[str, Any] | None:
    """This node as slurmctld shows it (read-only; only on the live system), or None without Slurm."""
    if config.slurm is None or not root.is_live:
        return None
    from .effects import EffectError, SystemEffects
    from .slurm import SlurmError, parse_nodes

    try:
        code, out, err = SystemEffects(root).run_command([config.slurm.scontrol, "--oneliner", "show", "node",
                                                          config.slurm.node], 30.0)
        if code != 0:
            raise SlurmError(err.strip() or f"exit {code}")
        node = parse_nodes(out).get(config.slurm.node)
        if node is None:
            raise SlurmError(f"slurmctld knows no node {config.slurm.node!r}")
    except (OSError, EffectError, SlurmError) as e:  # status never fails on what it only reports
        return {"node": config.slurm.node, "error": f"{config.slurm.node}: {e}"}
    ours = " (drained by nvidia-kmod-swap)" if node.ours else ""
    return {"node": node.name, "states": list(node.states), "reason": node.reason, "ours": node.ours,
            "shown": node.shown() + ours}


def _status(root: Root, config: Config, as_json: bool) -> int:
    import json

    from .holders import find_holders
    from .plan import direction
    from .snapshot import read_snapshot

    snapshot = read_snapshot(root)
    family = snapshot.family()
    loaded = snapshot.version("nvidia")
    change: str
    try:
        change = "" if loaded == config.driver_version else direction(loaded, config.driver_version)
    except ValueError as e:
        change = f"unknown: {e}"
    modules = [snapshot.modules[n] for n in family]
    holders = find_holders(root) if family else []
    pending = _pending(root, config)
    from .journal import read_decisions, summarize
    from .state import StateDir, StateError

    decisions = read_decisions() if root.is_live else None
    history: dict[str, Any] = (summarize(decisions) if decisions is not None
                               else {"last_swap": None, "pending": None})
    try:
        record = StateDir(root(config.state_dir)).deferred()
        failure = StateDir(root(config.state_dir)).failed()
    except StateError:
        record, failure = None, None
    # A swap to this driver that failed is not tried again: say so even without a journal to read.
    blocked = ({"expected_version": failure.driver_version, "why": failure.reason}
               if failure is not None and failure.driver_version == config.driver_version and change else None)
    if record is not None and change:
        import time

        # The state directory's record is the helper's own, and there even without systemd-python.
        history["pending"] = {"since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.since)),
                              "why": record.reason, "waits_for": record.waits_for,
                              "holder_units": list(record.holder_units)}
    if as_json:
        print(json.dumps({
            "running_kernel": snapshot.kernel_release,
            "config_kernel": config.kernel_release,
            "expected_version": config.driver_version,
            "loaded_version": loaded,
            "change": change,
            "modules": [{"name": m.name, "version": m.version, "refcnt": m.refcnt, "holders": sorted(m.holders)}
                        for m in modules],
            "gpu_holders": [h._asdict() for h in holders],
            "interrupted_swap": pending,
            "last_swap": history["last_swap"],
            "deferred": history["pending"],
            "blocked": blocked,
            "userspace": _userspace(root, config),
            "slurm": _slurm_node(root, config),
        }, indent=2))
        return 0
    print(f"expected driver: {config.driver_version} (for kernel {config.kernel_release})")
    print(f"running kernel:  {snapshot.kernel_release}")
    print(f"loaded driver:   {loaded or 'none'}" + (f" (pending: {change} to {config.driver_version})" if change else ""))
    for m in modules:
        print(f"  {m.name:<16} {m.version or '-':<12} refcount {m.refcnt:<3} held by {', '.join(sorted(m.holders)) or '-'}")
    for h in holders:
        print(f"  GPU held: pid {h.pid} ({h.comm}) {h.path} {h.unit or ''}".rstrip())
    if pending:
        print("an interrupted swap is pending: the next `swap` finishes or rolls it back")
    last = history["last_swap"]
    if last:
        print(f"last swap:       {last['when']}: {last['result']} ({last['from'] or 'none'} -> {last['to']})")
    if blocked:
        print(f"blocked:         the swap to {blocked['expected_version']} failed: {blocked['why']}; not tried again "
              "until `nvidia-kmod-swap swap --retry` or another driver")
    if history["pending"] and change:
        deferred = history["pending"]
        print(f"deferred since:  {deferred['since']}: {deferred['why']}")
        if deferred.get("waits_for") == "idle":
            print("                 the swap runs by itself once the GPU is idle (retry-deferred)")
    _print_userspace(_userspace(root, config))
    node = _slurm_node(root, config)
    if node is not None:
        print(f"slurm node:      {node['shown']}" if "shown" in node else f"slurm node:      {node['error']}")
    if decisions is None and root.is_live:
        print("(no systemd-python: the journal's history is not shown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
