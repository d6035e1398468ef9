"""Carries out a Plan under an exclusive lock: orchestration only. Decisions come from plan.py,
facts from facts.py/snapshot.py, every change goes through effects.py, every record through
state.py.

The run is lock-and-dispatch: Swapper.run takes the lock and hands the plan to one procedure
(apply, roll back, recover, keep a failed load), each of which returns an Outcome: the exit code
and the one journal entry that says how it ended, which run reports in one place. Progress on the
way (steps, "failed ..., rolling back") is journalled as it happens. What changed is always read
from sysfs, never from how far a run believes it got.

Two exceptions, two meanings: Refused (nothing was touched: the lock, the state dir) and
CheckFailed (after a change, sysfs, the device nodes or the verify command disagree: roll back).
A state file is written before every step; any failure after the first change rolls back by
converging on the modules that were loaded before (plan.plan_restore). A run that finds a state
file left by a crash finishes or rolls back that swap, and starts the units it had stopped,
before it does anything else. Stopped units and the autoload block are context managers: they
are undone however a procedure ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from . import byname, devices, userspace
from . import params as params_mod
from .config import Config
from .effects import EffectError, Effects, KmodError, kmod_tool
from .facts import driver_modules, make_plan
from .fleet import Gate, SlurmGate, gated
from .holders import wait_until_released
from .journal import Reporter
from .models import DEFER, Event, Outcome, Priority
from .modinfo import ModInfo, ModuleFiles
from .paths import Root
from .plan import LoadStep, Plan, allowed, changed_since, plan_restore, q, restore_problems
from .rules import AUTOLOAD_BLOCK, CORE, FIRMWARE_PATH, LOADED_DRIVER, PIN_RULES, bin_output
from .snapshot import Snapshot, read_snapshot
from .state import (
    DEFERRED_RECORD,
    FAILED_RECORD,
    LOADED_RECORD,
    STATE_FILE,
    DeferredRecord,
    DriverRecord,
    FailedRecord,
    LoadedRecord,
    StateDir,
    StateError,
    SwapState,
)

EXIT_OK, EXIT_REFUSED, EXIT_ROLLED_BACK, EXIT_ROLLBACK_FAILED, EXIT_DEFERRED = 0, 1, 3, 4, 75
# A load with no driver loaded before failed: what did load is kept (there is no driver to go back
# to), the failure is recorded and reported.
EXIT_LOAD_FAILED = 5
LOCK_FILE = "lock"
# Test hook for the crash scenarios: SIGKILL ourselves right after the state for step N is written.
FAILPOINT_ENV = "NVIDIA_KMOD_SWAP_KILL_AT_STEP"
# Test hook for a stop job's SIGTERM landing while step N's syscall runs: sent to ourselves right
# after the kernel has done step N, before this run has noted it.
TERM_FAILPOINT_ENV = "NVIDIA_KMOD_SWAP_TERM_AFTER_STEP"
VERIFY_TIMEOUT_S = 60.0

__all__ = ["EXIT_DEFERRED", "EXIT_LOAD_FAILED", "EXIT_OK", "EXIT_REFUSED", "EXIT_ROLLBACK_FAILED", "EXIT_ROLLED_BACK",
           "LOCK_FILE", "STATE_FILE", "CheckFailed", "Refused", "Swapper", "Terminated", "deferral", "lock_within",
           "plan_after_grace", "report"]


class Refused(Exception):
    """Nothing was touched: the run could not start (the lock, the state dir)."""


class CheckFailed(Exception):
    """After a change, sysfs, the device nodes or the verify command disagree: roll back."""


class Terminated(Exception):
    """SIGTERM (systemd's start timeout): raised once, so that the rollback and the restart of
    stopped units run; Python runs no `finally` when a signal kills it."""


def _decided_at(depth: int) -> tuple[str, int, str]:
    """(file, line, function) of the frame DEPTH levels above the caller: the journal's CODE_*."""
    frame = sys._getframe(depth + 1)
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def outcome(code: int, event: Event, message: str, priority: Priority = "info", **fields: Any) -> Outcome:
    """An Outcome, noting where it was decided (the caller) for the journal's CODE_* fields."""
    return Outcome(code, event, message, priority, fields, _decided_at(1))


def lock_within(fd: int, operation: int, timeout: float, waiting: Callable[[], None] | None = None) -> bool:
    """flock(FD, OPERATION) without blocking, retried every 0.1 s for up to TIMEOUT seconds;
    whether it was taken. WAITING is called once, when the lock is first found held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if waiting is not None:
                waiting()
                waiting = None
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def plan_after_grace(root: Root, config: Config, plan: Plan, retry: bool = False) -> Plan:
    """A plan that processes' holds stand in the way of, made again once they are gone or after
    config.busy_grace_s: NVML, nvidia-smi or a CDI generator open /dev/nvidiactl for a moment, and
    such a moment between `check` and `swap` must not fail or defer the unit."""
    if not plan.holders or config.busy_grace_s <= 0 or not wait_until_released(root, config.busy_grace_s, 0.1):
        return plan
    return make_plan(root, config, retry=retry)


def deferral(state: StateDir, plan: Plan, code: int, message: str, **fields: object) -> Outcome:
    """A deferral, from `check` or from `swap`: recorded in the state dir for `retry-deferred` and
    `status` (best effort: a deferral must not fail on its bookkeeping); the Outcome reports it."""
    record = DeferredRecord(plan.expected_version, plan.loaded_version, plan.waits_for or "idle", plan.reason,
                            tuple(h.pid for h in plan.holders), tuple(sorted({h.unit for h in plan.holders if h.unit})),
                            time.time())
    since: float | None
    try:
        state.ensure()
        since = state.record_deferral(record).since
    except (OSError, StateError):
        since = None
    return Outcome(code, "deferred", message, "warning",
                   dict(reason=plan.reason, holder_pids=[h.pid for h in plan.holders],
                        holder_units=[h.unit for h in plan.holders if h.unit], waits_for=plan.waits_for,
                        deferred_since=since, **fields),
                   _decided_at(1))


def report(reporter: Reporter, result: Outcome) -> int:
    """The one journal entry of RESULT; its exit code."""
    reporter.event(result.event, result.message, result.priority, origin=result.origin, **(result.fields or {}))
    return result.code


def describe_loaded(snapshot: Snapshot, names: Iterable[str]) -> str:
    """What sysfs shows for NAMES: 'nvidia 570.124.04, nvidia_uvm (not loaded)'."""
    parts = []
    for name in names:
        module = snapshot.modules.get(name)
        parts.append(f"{name} (not loaded)" if module is None else f"{name} {module.version or '(no version)'}")
    return ", ".join(parts) or "nothing"


_FROM_ENV = -1  # kill_at_step's default: the failpoint in FAILPOINT_ENV, if any


class Swapper:
    """Carries out a plan under the lock: unload, load, verify, roll back on failure, recover an interrupted swap."""

    def __init__(self, root: Root, config: Config, effects: Effects, reporter: Reporter,
                 lock_timeout_s: float | None = None, retry: bool = False,
                 kill_at_step: int | None = _FROM_ENV) -> None:
        self.root = root
        self.config = config
        self.effects = effects
        self.reporter = reporter
        self.lock_timeout_s = lock_timeout_s  # default: config.lock_timeout_s
        self.retry = retry
        self.kill_at_step = _env_int(FAILPOINT_ENV) if kill_at_step == _FROM_ENV else kill_at_step
        self.term_after_step = _env_int(TERM_FAILPOINT_ENV) if kill_at_step == _FROM_ENV else None
        self._step = 0
        self._terminated = False

    @property
    def state(self) -> StateDir:
        return StateDir(self.root(self.config.state_dir))

    # -- lock and dispatch -----------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.state.ensure()
        except StateError as e:
            raise Refused(f"{e}; nothing was touched") from e
        with self._lock(), self._sigterm():
            try:
                result = self._dispatch()
            finally:
                # A block left by an earlier run that was killed: never leave the kernel unable to
                # load the driver by name.
                self._lift_autoload_block()
            # However it ended, programs started from now on get the loaded driver's libraries.
            self.keep_userspace()
        return report(self.reporter, result)

    def settle_drain(self) -> int:
        """The retry timer's tick when no swap is deferred but a Slurm drain of ours is recorded:
        its resume failed after a swap (slurmctld did not answer), or the swap is under way. Once
        the loaded driver is this generation's and no run holds the lock, the drain is given back
        (fleet.SlurmGate.settle); otherwise the next tick looks again."""
        gate = SlurmGate.of(self.config, self.effects, self.reporter, self.state)
        if gate is None:
            return EXIT_OK
        if gate.drain_failed():
            # A failed swap's drain is an admin's to read and lift (the next switch's check says so
            # again): no plan every tick for it.
            return EXIT_OK
        with self._lock(wait=False) as taken:
            if taken and self.state.swap_state() is None and make_plan(self.root, self.config).action == "none":
                gate.settle()
        return EXIT_OK

    def pin(self) -> int:
        """The `pin` command (the switch runs it before systemd-tmpfiles-resetup): the driver links
        follow the loaded module, under the lock so that no swap changes it meanwhile."""
        try:
            self.state.ensure()
        except StateError as e:
            raise Refused(f"{e}; nothing was touched") from e
        with self._lock():
            self.keep_userspace()
        return EXIT_OK

    def _dispatch(self) -> Outcome:
        try:
            pending = self.state.swap_state()
        except StateError as e:
            snapshot = read_snapshot(self.root)
            return outcome(EXIT_ROLLBACK_FAILED, "rollback-failed",
                           f"refusing to act: {e}. A swap may have been interrupted; the loaded modules are "
                           f"{describe_loaded(snapshot, snapshot.family())}. Check them (nvidia-kmod-swap status), "
                           f"then remove {self.state.path / STATE_FILE}", "crit", reason=str(e))
        if pending is not None:
            recovered = self._recover(pending)
            if recovered.code == EXIT_ROLLBACK_FAILED:
                return recovered
            report(self.reporter, recovered)  # then plan afresh
        plan = plan_after_grace(self.root, self.config, make_plan(self.root, self.config, retry=self.retry), self.retry)
        return self._execute(plan)

    def _execute(self, plan: Plan) -> Outcome:
        fields: dict[str, Any] = dict(action=plan.action, loaded_version=plan.loaded_version,
                                      expected_version=plan.expected_version, direction=plan.direction)
        gate = SlurmGate.of(self.config, self.effects, self.reporter, self.state)
        match plan.action:
            case "none":
                self.state.remove(DEFERRED_RECORD)
                if gate is not None:
                    gate.settle()
                return outcome(EXIT_OK, "noop", plan.reason, **fields)
            case "defer":
                if gate is not None and plan.waits_for == "idle":
                    # Drained while it waits, so that the GPU's jobs end and no new one starts; once
                    # no job is left, Slurm's own holders (slurmd's NVML) are stopped for the swap.
                    held = gate.hold(plan.loaded_version, plan.expected_version)
                    if held.proceed:
                        return self._apply_drained(gate, plan, fields, held)
                    fields["fleet"] = held.why
                    plan = plan._replace(reason=f"{held.why}; and {plan.reason}")
                return deferral(self.state, plan, EXIT_DEFERRED, f"deferred: {plan.reason}", **fields)
            case "refuse":
                return outcome(EXIT_REFUSED, "refused", f"refused: {plan.reason}", "err", reason=plan.reason,
                               holder_pids=[h.pid for h in plan.holders], **fields)
            case "load" | "swap":
                problem = self._preflight()
                if problem:
                    return outcome(EXIT_REFUSED, "refused", f"refused: {problem}", "err", reason=problem, **fields)
                if gate is None:
                    return self._apply(plan, fields)
                return self._apply_drained(gate, plan, fields)
        raise AssertionError(f"unknown action {plan.action!r}")

    def _apply_drained(self, gate: SlurmGate, plan: Plan, fields: dict[str, Any], held: Gate | None = None) -> Outcome:
        """A swap on a Slurm node: drained and without a job first, resumed once verified, left
        drained with its reason when it failed (fleet.py)."""
        held = held or gate.hold(plan.loaded_version, plan.expected_version)
        if not held.proceed:
            waiting = plan._replace(action=DEFER, reason=held.why, waits_for="idle")
            return deferral(self.state, waiting, EXIT_DEFERRED, f"deferred: {held.why}", **fields)
        # The drain may have taken a moment, and a job may have ended or begun before it: plan again,
        # with Slurm's own units stoppable now that no job is left (fleet.gated).
        base = self.config
        self.config = gated(base)
        try:
            replanned = plan_after_grace(self.root, self.config, make_plan(self.root, self.config, retry=self.retry),
                                         self.retry)
            if not replanned.changes_kernel:
                self.config = base
                return self._execute(replanned) if replanned.action != DEFER else deferral(
                    self.state, replanned, EXIT_DEFERRED, f"deferred: {replanned.reason}", **fields)
            result = self._apply(replanned, fields)
        finally:
            self.config = base
        match result.event:
            case "swapped":
                gate.release(f"NVIDIA driver {replanned.expected_version} loaded and verified")
            case "deferred" | "noop":
                pass  # still held: the drain stays while it waits; or swapped meanwhile (settled)
            case _:
                # A refusal before anything changed keeps the old driver with the new userspace's
                # profile: not a node to give jobs to either.
                gate.fail(replanned.loaded_version, replanned.expected_version, (result.fields or {}).get("reason")
                          or result.message)
        return result

    @contextmanager
    def _lock(self, wait: bool = True) -> Iterator[bool]:
        """The swap lock, waiting up to lock_timeout_s for it; without WAIT, whether it was free."""
        try:
            fd = os.open(self.state.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise Refused(f"cannot open the lock {self.state.path / LOCK_FILE}: {e.strerror}; nothing was touched") from e
        try:
            if not wait:
                yield lock_within(fd, fcntl.LOCK_EX, 0)
                return
            timeout = self.config.lock_timeout_s if self.lock_timeout_s is None else self.lock_timeout_s
            if not lock_within(fd, fcntl.LOCK_EX, timeout, lambda: self.reporter.event(
                    "step", "another nvidia-kmod-swap run holds the lock; waiting", "notice")):
                raise Refused(f"another run held {self.state.path / LOCK_FILE} for {timeout:.0f}s")
            yield True
        finally:
            os.close(fd)

    @contextmanager
    def _sigterm(self) -> Iterator[None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self._terminated:
                self._terminated = True
                raise Terminated("terminated by SIGTERM (systemd's start timeout?)")

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (tests): no handler
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _lift_autoload_block(self) -> None:
        if os.path.lexists(self.root(AUTOLOAD_BLOCK)):
            try:
                self.effects.unblock_autoload()
            except OSError as e:
                self.reporter.event("step", f"could not remove {AUTOLOAD_BLOCK}: {e.strerror}", "warning")

    @contextmanager
    def _autoload_blocked(self, names: Iterable[str]) -> Iterator[None]:
        """From the first unload until the new driver is loaded (or the old one again), an open of
        a stale /dev/nvidia* node would make the kernel modprobe the booted driver
        (MODULE_ALIAS_CHARDEV_MAJOR(195)): modprobe of NAMES runs `false` meanwhile."""
        self.effects.block_autoload(sorted(set(names)))
        try:
            yield
        finally:
            self._lift_autoload_block()

    @contextmanager
    def _units_stopped(self, swap: SwapState) -> Iterator[None]:
        """Whatever the procedure inside ends with, the units it stopped (swap.stopped_units) are
        started again."""
        try:
            yield
        finally:
            if swap.stopped_units:
                self._start_units(swap.stopped_units)

    # -- state records ---------------------------------------------------------------------------
    def _save(self, swap: SwapState, best_effort: bool = False) -> None:
        swap.updated = time.time()
        try:
            self.state.write(STATE_FILE, swap.to_json())
        except OSError as e:
            if not best_effort:
                raise
            self.reporter.event("step", f"could not update {self.state.path / STATE_FILE} ({e.strerror}); "
                                "carrying on with the rollback", "warning")

    def _record_step(self, swap: SwapState, phase: str, detail: str) -> None:
        swap.phase, swap.step, swap.detail = phase, self._step, detail
        self._save(swap)
        self.reporter.event("step", f"step {self._step}: {detail}", "debug", phase=phase)
        if self.kill_at_step == self._step:
            os.kill(os.getpid(), signal.SIGKILL)
        self._step += 1

    def _term_failpoint(self) -> None:
        if self.term_after_step is not None and self.term_after_step == self._step - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Terminated here

    # -- the driver links follow the loaded module (userspace.py) ----------------------------------
    def keep_userspace(self) -> userspace.Pin | None:
        """Pins /run/opengl-driver(-32) to the loaded driver's environments while it is not this
        generation's, unpins them when it is, and says so when it changed; what the links show is
        read back, never assumed. Never fails the run: a warning says what could not be done."""
        try:
            pin = userspace.current(self.root, self.config)
            self._apply_pin(pin)
            return pin
        except (OSError, EffectError, StateError) as e:
            self.reporter.event("unpinnable", f"could not set the driver links ({e}): programs started now may "
                                "load another driver's libraries than the loaded module's", "warning")
            return None

    def _apply_pin(self, pin: userspace.Pin) -> None:
        rules = pin.rules()
        try:
            before: str | None = self.root(PIN_RULES).read_text(errors="surrogateescape")
        except FileNotFoundError:
            before = None
        wanted = dict(pin.links) if pin.pinned else dict(self.config.driver_links or ())
        links = userspace.shown(self.root)
        if rules != before or any(links.get(link) != target for link, target in wanted.items()):
            self.effects.set_pin_rules(rules)
            self.effects.apply_tmpfiles(list(userspace.DRIVER_LINKS))
            links = userspace.shown(self.root)
        wrong = {link: links.get(link) or "nothing" for link, target in wanted.items() if links.get(link) != target}
        tools = bin_output(pin.nvidia_smi) if pin.version else None
        self.effects.set_link(LOADED_DRIVER, tools)
        if self.config.gc_root_dir:
            # The pinned environments stay while programs use them (a GC of the generation that
            # loaded them must not take them); a booted one is rooted by booted-system anyway.
            self.effects.set_gc_roots(f"{self.config.gc_root_dir}-pin",
                                      {os.path.basename(link): target for link, target in pin.links})
        fields: dict[str, Any] = dict(loaded_version=pin.version, expected_version=self.config.driver_version,
                                      links={link: links.get(link) for link in wanted}, nvidia_smi=pin.nvidia_smi)
        if wrong:
            self.reporter.event("unpinnable", f"the driver links do not show what they should: "
                                f"{', '.join(f'{k} -> {v}' for k, v in wrong.items())} "
                                f"(wanted {', '.join(f'{k} -> {wanted[k]}' for k in wrong)})", "warning", **fields)
        elif pin.pinned and rules != before:
            self.reporter.event("pinned", f"driver links pinned to the loaded driver {pin.version}: "
                                f"{', '.join(f'{k} -> {v}' for k, v in pin.links)}; {pin.reason}", "notice", **fields)
        elif not pin.pinned and before is not None:
            self.reporter.event("unpinned", f"driver links unpinned: {pin.reason}"
                                + (f" ({', '.join(f'{k} -> {v}' for k, v in wanted.items())})" if wanted else ""),
                                "notice", **fields)
        if pin.problem and self.config.driver_links:
            self.reporter.event("unpinnable", pin.problem, "warning", **fields)

    # -- apply a plan ------------------------------------------------------------------------------
    def _apply(self, plan: Plan, fields: dict[str, Any]) -> Outcome:
        swap = SwapState(plan.expected_version, plan.loaded_version, plan.load, plan.rollback)
        record = self.state.driver(plan.loaded_version) if plan.loaded_version else None
        if record is not None:
            # A rollback needs the loaded driver's own GSP firmware, which activation has just
            # taken off the firmware path, and its own nvidia-smi to tell whether it works.
            swap.rollback_firmware_path = record.firmware_path
            swap.rollback_verify_command = record.verify_command
        try:
            self._save(swap)  # before anything: a state dir we cannot write stops us here
        except OSError as e:
            reason = f"cannot write {self.state.path / STATE_FILE}: {e.strerror}; nothing was touched"
            return outcome(EXIT_REFUSED, "refused", f"refused: {reason}", "err", reason=reason, **fields)
        with self._units_stopped(swap):
            if plan.stop_units:
                plan = self._stop_units(plan, swap)
                if not plan.changes_kernel:
                    self.state.remove(STATE_FILE)
                    return self._execute(plan)  # deferred after all, or someone else swapped meanwhile
            self.reporter.event("plan", f"{plan.reason}: unload {' '.join(plan.unload) or 'nothing'}; "
                                        f"load {' '.join(s.name for s in plan.load)}", "notice",
                                modules=[s.name for s in plan.load], **fields)
            for note in plan.notes:
                self.reporter.event("plan", note, "warning", **fields)
            return self._swap(plan, swap)

    def _preflight(self) -> str | None:
        """What would fail after the unload and can be known before it."""
        argv = self.config.verify_command
        if argv and not os.access(argv[0], os.X_OK):
            what = "does not exist" if not os.path.lexists(argv[0]) else "is not executable"
            return f"the verify command {argv[0]} {what}; nothing was unloaded"
        return None

    def _stop_units(self, plan: Plan, swap: SwapState) -> Plan:
        self.reporter.event("busy", f"stopping {', '.join(plan.stop_units)} to free the GPU", "notice",
                            holder_units=plan.stop_units, holder_pids=[h.pid for h in plan.holders])
        for unit in plan.stop_units:
            swap.stopped_units.append(unit)
            self._record_step(swap, "stopping-units", f"stop {unit}")  # recorded before it is stopped
            self.effects.systemctl(["stop", unit])
        # A stopped unit's processes may take a moment to close the device: wait a bounded time,
        # looking only at who holds it, then plan once.
        wait_until_released(self.root, self.config.settle_timeout_s, 0.2)
        replanned = make_plan(self.root, self.config, retry=self.retry)
        if replanned.stop_units or replanned.holders:
            return Plan(DEFER, f"the GPU is still in use after stopping {', '.join(swap.stopped_units)}: "
                        + "; ".join(h.describe() for h in replanned.holders)
                        + "; the stopped units are started again", replanned.expected_version,
                        replanned.loaded_version, replanned.running_kernel, replanned.config_kernel, holders=replanned.holders)
        return replanned

    def _start_units(self, units: list[str]) -> None:
        for unit in units:
            try:
                # --no-block: a unit ordered after ours would otherwise wait for us, and we for it.
                self.effects.systemctl(["start", "--no-block", unit])
            except EffectError as e:
                self.reporter.event("failed", f"could not start {unit} again: {e}", "err")

    def _swap(self, plan: Plan, swap: SwapState) -> Outcome:
        self._step = 0
        try:
            for name in plan.prerequisites:
                self._record_step(swap, "prerequisites", f"load {name} from the running kernel's tree")
                self.effects.load_by_name(name)
            # Subscribed before the loads, so that their udev events are not missed; and before the
            # first unload, so that pyudev's import (~0.75 s in the emulated test bed) is not spent
            # while no driver is loaded.
            watch = devices.UdevWatch(self.root)
        except Exception as e:  # nothing of the driver was touched yet
            return self._failed(plan, swap, e)
        with ExitStack() as stack:  # the block is lifted however this ends, after a rollback too
            try:
                stack.enter_context(self._autoload_blocked({CORE, *plan.unload, *(s.name for s in plan.load)}))
            except OSError as e:  # it could not be written: nothing of the driver was touched yet
                return self._failed(plan, swap, e)
            try:
                for name in plan.unload:
                    self._record_step(swap, "unloading", f"unload {name} {plan.loaded_version or ''}".strip())
                    self._unload(name)
                    self._term_failpoint()
                    swap.changed = True
                if self.config.firmware_path is not None:
                    self._point_firmware(self.config.firmware_path)
                for step in plan.load:
                    self._record_step(swap, "loading", f"load {step.path} {step.params}".strip())
                    self.effects.load(step.path, step.params)
                    self._term_failpoint()
                    swap.changed = True
                self._record_step(swap, "verifying", "verify versions, device nodes and the verify command")
                self._verify(plan.load, plan.expected_version, watch)
            except Exception as e:  # any failure after the first change is rolled back, whatever it was
                return self._failed(plan, swap, e)
        self._finish_loaded(plan.load, plan.expected_version)
        self.state.remove(FAILED_RECORD)
        self.state.remove(DEFERRED_RECORD)
        return outcome(EXIT_OK, "swapped", f"NVIDIA driver {plan.expected_version} loaded"
                       + (f" ({plan.direction} from {plan.loaded_version})" if plan.loaded_version else ""), "notice",
                       modules=[s.name for s in plan.load], loaded_version=plan.expected_version,
                       previous_version=plan.loaded_version, direction=plan.direction)

    def _failed(self, plan: Plan, swap: SwapState, error: Exception) -> Outcome:
        """A step of PLAN failed with ERROR: what happens next depends on what sysfs shows."""
        reason = str(error) or type(error).__name__
        # What changed is what sysfs shows, not how far this run believes it got: a SIGTERM
        # landing while delete_module runs leaves the module gone and `changed` unset.
        after = read_snapshot(self.root)
        changed = swap.changed or changed_since(after, plan)
        # A stop (SIGTERM) says nothing about the driver: the next start may try again.
        failure = None if isinstance(error, Terminated) else FailedRecord(
            plan.expected_version, tuple(s.path for s in plan.load), reason)
        if plan.loaded_version is None:
            return self._load_failed(plan, reason, after, changed, failure)
        if not changed:
            self.state.remove(STATE_FILE)
            return outcome(EXIT_REFUSED, "refused", f"swap to {plan.expected_version} failed before anything changed: "
                           f"{reason}. Nothing was unloaded; the loaded driver keeps running", "err", reason=reason)
        self.reporter.event("failed", f"swap to {plan.expected_version} failed: {reason}; rolling back "
                            f"to {plan.loaded_version}", "err", reason=reason)
        result = self._rollback(swap, reason)
        self._record_failure(failure)
        return result

    def _record_failure(self, failure: FailedRecord | None) -> None:
        if failure is None:
            return
        try:
            self.state.write(FAILED_RECORD, failure.to_json())
        except OSError as e:
            self.reporter.event("step", f"could not write {FAILED_RECORD} ({e.strerror})", "warning")

    def _load_failed(self, plan: Plan, reason: str, after: Snapshot, changed: bool,
                     failure: FailedRecord | None) -> Outcome:
        """A load with no NVIDIA driver loaded before failed. Nothing is rolled back to "no driver"
        (at boot, one GPU of eight failing verification would leave none working): what loaded is
        kept, the failure recorded so that a restart does not try the same files again, and the
        message says what is loaded now."""
        self.state.remove(STATE_FILE)
        self._record_failure(failure)
        names = [s.name for s in plan.load]
        loaded = [n for n in names if n in after.modules]
        fields: dict[str, Any] = dict(reason=reason, loaded_version=None, expected_version=plan.expected_version)
        if changed and loaded:
            if set(loaded) == set(names):
                self._finish_loaded(plan.load, plan.expected_version)
            return outcome(EXIT_LOAD_FAILED, "failed", f"loading the NVIDIA driver {plan.expected_version} failed: "
                           f"{reason}. Kept what loaded ({describe_loaded(after, loaded)}): there was no driver before "
                           f"it to go back to; not loaded: {', '.join(n for n in names if n not in loaded) or 'none'}",
                           "crit", **fields)
        others = [n for n in plan.prerequisites if n in after.modules]
        return outcome(EXIT_LOAD_FAILED, "failed", f"loading the NVIDIA driver {plan.expected_version} failed: {reason}. "
                       "No NVIDIA driver is loaded" + (f" (loaded for it: {', '.join(others)})" if others else ""),
                       "err", **fields)

    def _unload(self, name: str) -> None:
        """Unloads NAME; a reference that goes away within busy_grace_s (an NVML client closing
        /dev/nvidiactl) is waited out, a lasting one fails as the kernel says."""
        deadline = time.monotonic() + self.config.busy_grace_s
        while True:
            try:
                self.effects.unload(name)
                return
            except KmodError as e:
                if e.errno not in (errno.EAGAIN, errno.EBUSY) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.1)

    def _point_firmware(self, path: str) -> None:
        """Points the firmware loader at PATH (the driver about to be loaded initialises its GPUs
        from there), unless it already is."""
        current = self._firmware_path()
        if current == path:
            return
        self.effects.set_firmware_path(path)
        self.reporter.event("step", f"firmware path: {current or '(default)'} -> {path}", "info")

    def _firmware_path(self) -> str | None:
        try:
            return self.root(FIRMWARE_PATH).read_text(errors="surrogateescape").strip()
        except OSError:
            return None

    def _finish(self, load: tuple[LoadStep, ...], version: str) -> None:
        # The files themselves, not their links in the generation's module tree (aggregateModules):
        # a GC of that generation must not take the next swap's rollback source with it.
        resolved = tuple(s._replace(path=os.path.realpath(s.path)) for s in load)
        # The driver's other modules too (a later `modprobe nvidia_drm` loads them through
        # _route_by_name): the next swap needs every loaded module's file to roll back to.
        shipped = self._shipped(resolved, version)
        loaded = {s.name for s in resolved}
        extra = [m for m in shipped if m.name not in loaded]
        # Loaded later by name, they get today's modprobe.d options ($CMDLINE_OPTS): recorded as such.
        options = params_mod.collect(self.root, [m.name for m in extra]) if extra else {}
        record = resolved + tuple(LoadStep.of(m, options.get(m.name, "")) for m in extra)
        self.state.write(LOADED_RECORD, LoadedRecord(version, record).to_json())
        firmware = self._firmware_path()
        try:
            self.state.write_driver(DriverRecord(version, firmware, self.config.verify_command,
                                                 self.config.driver_links, self.config.nvidia_smi))
        except OSError as e:
            self.reporter.event("step", f"could not note the driver's firmware path ({e.strerror})", "warning")
        self.state.remove(STATE_FILE)
        self._keep_on_disk(resolved, firmware, self.config.verify_command, self.config.driver_links or ())
        self._route_by_name(shipped, version)

    def _finish_loaded(self, load: tuple[LoadStep, ...], version: str) -> None:
        """_finish for a driver that is loaded whatever its records say: a record that cannot be
        written (a full /run) is a warning, not a failure of the load."""
        try:
            self._finish(load, version)
        except OSError as e:
            self.reporter.event("step", f"could not record the loaded driver in {self.state.path}: {e.strerror}; "
                                "the next bump may find no file to roll back to", "warning")

    def _keep_on_disk(self, load: tuple[LoadStep, ...], firmware: str | None,
                      verify: tuple[str, ...] | None, links: tuple[tuple[str, str], ...] = ()) -> None:
        """GC roots for everything a rollback to the loaded driver needs: each module file, its
        firmware directory and its verify command (a generation's hardware.firmware environment
        and nvidia-smi are store paths of that generation alone); the previous roots are dropped."""
        if not self.config.gc_root_dir:
            return
        wanted = {s.name: s.path for s in load}
        if firmware:
            wanted["firmware"] = firmware
        if verify:
            wanted["verify-command"] = verify[0]
        # Its driver environments (graphics.nix's buildEnv, of that generation alone): what a pin to
        # this driver points programs at while a later generation waits for its swap.
        for link, target in links:
            wanted[os.path.basename(link)] = target
        resolved = {n: Path(os.path.realpath(p)) for n, p in wanted.items()}
        targets = {n: str(p) for n, p in resolved.items() if allowed(p, self.config.allowed_prefixes)}
        try:
            self.effects.set_gc_roots(self.config.gc_root_dir, targets)
        except (OSError, EffectError) as e:
            self.reporter.event("step", f"could not update the GC roots in {self.config.gc_root_dir}: {e}", "warning")

    def _shipped(self, load: tuple[LoadStep, ...], version: str | None) -> list[ModInfo]:
        """The modules of the driver whose files LOAD are (facts.driver_modules); [] if unreadable."""
        try:
            return driver_modules(load, version) if load and version else []
        except OSError as e:
            self.reporter.event("step", f"could not list the files beside {load[0].path}: {e.strerror}", "warning")
            return []

    def _route_by_name(self, modules: list[ModInfo], version: str | None) -> None:
        """Later loads by name (modprobe) get the loaded driver's files, not the booted tree's
        (byname.py); nothing to route when the loaded driver is the booted one."""
        try:
            booted = ModuleFiles(self.config.rollback_dirs)
            first = {m.name: booted.get(m.name)[:1] for m in modules}
            lines = byname.install_lines(modules, {n: os.path.realpath(p[0]) for n, p in first.items() if p},
                                         kmod_tool("modprobe"), kmod_tool("insmod")) if modules else []
            self.effects.route_by_name(byname.rules_text(lines, version or ""))
        except (OSError, EffectError) as e:
            self.reporter.event("step", f"could not route loads by name to the loaded driver ({byname.BY_NAME_RULES}): "
                                f"{e}; `modprobe` of a driver module that is not loaded gets the booted driver's "
                                "file until the next boot", "warning")
            return
        if lines:
            names = ", ".join(line.split(" ", 2)[1] for line in lines)
            self.reporter.event("step", f"loads by name of {names} get the files of {version} until the next boot "
                                f"({byname.BY_NAME_RULES})", "info")

    def _verify(self, load: tuple[LoadStep, ...], expected: str, watch: devices.UdevWatch | None = None) -> None:
        snapshot = read_snapshot(self.root)
        problems = restore_problems(snapshot, load)
        if problems:
            raise CheckFailed("after loading, sysfs shows: " + "; ".join(problems))
        self._fix_modprobe_nodes()
        nodes = devices.wait_for_nodes(self.root, set(snapshot.modules), self.config.settle_timeout_s, self.effects,
                                       watch=watch, loaded_now={s.name for s in load})
        if watch is not None:
            how = (f"udev reported its add events of {', '.join(sorted(watch.seen)) or 'none'} processed"
                   if watch.monitor is not None else "no udev to listen to: polled the device nodes")
            self.reporter.event("step", f"device nodes: {how}", "debug")
        if nodes:
            raise CheckFailed(f"device nodes not ready after {self.config.settle_timeout_s:.0f}s: {'; '.join(nodes)}")
        if self.config.verify_command:
            self._run_verify_command(self.config.verify_command, expected)

    def _fix_modprobe_nodes(self) -> None:
        try:
            fixed = devices.fix_modprobe_nodes(self.root, self.effects)
        except OSError as e:
            raise CheckFailed(f"cannot renew the nodes nvidia-modprobe made under /dev/nvidia-caps: {e}") from e
        if fixed:
            self.reporter.event("step", "nodes nvidia-modprobe made, pointed at the loaded driver: " + "; ".join(fixed),
                                "info")

    def _run_verify_command(self, command: tuple[str, ...], expected: str) -> None:
        argv = list(command)
        try:
            status, output, errors = self.effects.run_command(argv, VERIFY_TIMEOUT_S)
        except EffectError as e:
            raise CheckFailed(f"verify command: {e}") from e
        # Its answer is stdout, one line per GPU; stderr (a warning of a working nvidia-smi) is only
        # quoted when the answer is wrong.
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if status != 0 or not lines or any(line != expected for line in lines):
            said = f"; stderr {q(errors.strip().replace(chr(10), ' | '))}" if errors.strip() else ""
            raise CheckFailed(f"verify command {' '.join(argv)} exited {status} with "
                             f"{q(output.strip().replace(chr(10), ' | '))}{said}, expected {expected}")

    # -- rollback and recovery -------------------------------------------------------------------
    def _rollback(self, swap: SwapState, reason: str) -> Outcome:
        """Converge on swap.rollback: unload only what differs from it, load what is missing, then
        report what sysfs shows. Nothing is unloaded when a module that differs cannot be."""
        swap.phase, swap.reason = "rolling-back", reason
        self._save(swap, best_effort=True)
        target = swap.rollback
        old = swap.loaded_version or "no driver"
        snapshot = read_snapshot(self.root)
        restore = plan_restore(snapshot, target, scope=[s.name for s in swap.load])
        if not (restore.unload or restore.load or restore.blocked or restore_problems(snapshot, target)):
            self.state.remove(STATE_FILE)
            return outcome(EXIT_REFUSED, "recovery", f"nothing to roll back: sysfs shows {old} as before "
                           f"({describe_loaded(snapshot, [s.name for s in target])})", "warning")
        # A process that opened the new /dev/nvidiactl for a moment (an exporter, an nvidia-smi
        # poller) is waited out as the forward path waits for it: busy_grace_s.
        deadline = time.monotonic() + self.config.busy_grace_s
        while restore.blocked and time.monotonic() < deadline:
            time.sleep(0.1)
            snapshot = read_snapshot(self.root)
            restore = plan_restore(snapshot, target, scope=[s.name for s in swap.load])
        if restore.blocked:
            return self._rollback_failed(swap, reason, snapshot, (
                f"{', '.join(restore.blocked)} cannot be unloaded (references that are not modules: an open "
                f"/dev/nvidia* or another driver); nothing more was unloaded"))
        watch = devices.UdevWatch(self.root)
        try:
            for name in restore.unload:
                self._unload(name)
            if restore.load and swap.rollback_firmware_path is not None:
                self._point_firmware(swap.rollback_firmware_path)
            for step in restore.load:
                self.effects.load(step.path, step.params)
        except (EffectError, OSError) as e:
            return self._rollback_failed(swap, reason, read_snapshot(self.root), str(e))
        after = read_snapshot(self.root)
        problems = restore_problems(after, target)
        if problems:
            return self._rollback_failed(swap, reason, after, "; ".join(problems))
        try:
            self._fix_modprobe_nodes()
        except CheckFailed as e:
            return self._rollback_failed(swap, reason, after, str(e))
        if target:
            nodes = devices.wait_for_nodes(self.root, set(after.modules), self.config.settle_timeout_s, self.effects,
                                           watch=watch, loaded_now={s.name for s in restore.load})
            if nodes:
                return self._rollback_failed(swap, reason, after, "device nodes: " + "; ".join(nodes))
            if swap.rollback_verify_command and swap.loaded_version:
                # The old driver's own nvidia-smi: it opens every GPU, so an old driver without its
                # firmware shows here, not later in the user's job.
                try:
                    self._run_verify_command(swap.rollback_verify_command, swap.loaded_version)
                except CheckFailed as e:
                    return self._rollback_failed(swap, reason, after, f"the rolled-back driver does not work: {e}")
        self.state.remove(STATE_FILE)
        firmware = swap.rollback_firmware_path if swap.rollback_firmware_path is not None else self._firmware_path()
        record = self.state.driver(swap.loaded_version) if swap.loaded_version else None
        self._keep_on_disk(target, firmware, swap.rollback_verify_command,
                           record.driver_links or () if record is not None else ())
        self._route_by_name(self._shipped(target, swap.loaded_version), swap.loaded_version)
        shown = describe_loaded(after, [s.name for s in target]) if target else "no NVIDIA module"
        return outcome(EXIT_ROLLED_BACK, "rolled-back", f"rolled back: the NVIDIA driver {old} is loaded again "
                       f"(sysfs: {shown}; kept {len(restore.keep)}, reloaded {len(restore.load)}). Cause: {reason}",
                       "err", reason=reason, loaded_version=swap.loaded_version, expected_version=swap.expected_version)

    def _rollback_failed(self, swap: SwapState, reason: str, snapshot: Snapshot, why: str) -> Outcome:
        names = sorted({s.name for s in swap.rollback} | {s.name for s in swap.load} | set(snapshot.family()))
        return outcome(EXIT_ROLLBACK_FAILED, "rollback-failed", f"rollback failed: {why}. Loaded now (sysfs): "
                       f"{describe_loaded(snapshot, names)}. The state is kept in {self.state.path / STATE_FILE} "
                       f"and the next run retries", "crit", reason=f"{reason}; rollback: {why}",
                       loaded_version=swap.loaded_version, expected_version=swap.expected_version)

    def _recover(self, swap: SwapState) -> Outcome:
        """A state file means a run died mid-swap. All new and verified: keep it. Otherwise: old,
        recorded as failed (a swap that kills its run must not take the GPU away on every restart)."""
        with self._units_stopped(swap):
            snapshot = read_snapshot(self.root)
            if (swap.phase == "verifying" and swap.expected_version == self.config.driver_version
                    and not restore_problems(snapshot, swap.load)):
                try:
                    self._verify(swap.load, swap.expected_version)
                    self._finish(swap.load, swap.expected_version)
                    return outcome(EXIT_OK, "recovery",
                                   f"an interrupted swap to {swap.expected_version} had completed; kept it", "warning")
                except (CheckFailed, EffectError, OSError):
                    pass
            self.reporter.event("recovery", f"an interrupted swap (at {swap.phase}, step {swap.step}) is rolled back "
                                f"to {swap.loaded_version or 'no driver'}", "warning")
            reason = f"interrupted at {swap.phase} (step {swap.step}): the run was killed"
            result = self._rollback(swap, reason)
            if result.code == EXIT_ROLLED_BACK:
                # Not tried again on the next start: a swap that kills its run (a hung module init,
                # the start timeout's SIGKILL) would take the GPU away on every restart.
                self._record_failure(FailedRecord(swap.expected_version, tuple(s.path for s in swap.load), reason))
            return result
