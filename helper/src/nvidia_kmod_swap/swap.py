"""Carries out a Plan under an exclusive lock, with a state file written before every step, and
rolls back to the old modules on any failure. A run that finds a state file left by a crash
finishes or rolls back that swap before it does anything else.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import devices
from .config import Config
from .facts import FAILED_RECORD, LOADED_RECORD, make_plan
from .journal import Reporter
from .kmod import Kernel, KmodError
from .paths import Root
from .quick import STATE_FILE
from .plan import DEFER, NONE, REFUSE, LoadStep, Plan, driver_modules_current, unload_order
from .snapshot import read_snapshot

EXIT_OK, EXIT_REFUSED, EXIT_ROLLED_BACK, EXIT_ROLLBACK_FAILED, EXIT_DEFERRED = 0, 1, 3, 4, 75
LOCK_FILE = "lock"
# Test hook for the crash scenarios: SIGKILL ourselves right after the state for step N is written.
FAILPOINT_ENV = "NVIDIA_KMOD_SWAP_KILL_AT_STEP"


class SwapFailed(Exception):
    pass


@dataclass
class Swapper:
    root: Root
    config: Config
    kernel: Kernel
    reporter: Reporter
    run_systemctl: Callable[[list[str]], None] | None = None
    lock_timeout_s: float = 300.0
    retry: bool = False
    kill_at_step: int | None = field(default_factory=lambda: _env_int(FAILPOINT_ENV))
    _step: int = 0

    # -- state directory ---------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root(self.config.state_dir)

    def _ensure_state_dir(self) -> None:
        path = self.state_dir
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
            raise SwapFailed(f"state directory {path} is not a directory owned by us")
        os.chmod(path, 0o700)

    def _write(self, name: str, data: dict) -> None:
        tmp = self.state_dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_dir / name)
        dirfd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def _read_state(self) -> dict | None:
        try:
            fd = os.open(self.state_dir / STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd) as f:
            try:
                return json.load(f)
            except ValueError:
                return {"phase": "unknown", "rollback": []}

    def _record_step(self, state: dict, phase: str, detail: str) -> None:
        state.update(phase=phase, step=self._step, detail=detail, updated=time.time())
        self._write(STATE_FILE, state)
        self.reporter.event("step", f"step {self._step}: {detail}", "debug", phase=phase)
        if self.kill_at_step == self._step:
            os.kill(os.getpid(), signal.SIGKILL)
        self._step += 1

    # -- entry point ---------------------------------------------------------------------------
    def run(self) -> int:
        self._ensure_state_dir()
        with self._lock():
            pending = self._read_state()
            if pending is not None:
                code = self._recover(pending)
                if code == EXIT_ROLLBACK_FAILED:
                    return code
            plan = make_plan(self.root, self.config, retry=self.retry)
            return self._execute(plan)

    @contextmanager
    def _lock(self):
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        self.reporter.event("step", "another nvidia-kmod-swap run holds the lock; waiting", "notice")
                        waited = True
                    if time.monotonic() > deadline:
                        raise SwapFailed(f"another run held {self.state_dir / LOCK_FILE} for {self.lock_timeout_s:.0f}s")
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    # -- executing a plan ------------------------------------------------------------------------
    def _execute(self, plan: Plan) -> int:
        fields = dict(action=plan.action, loaded_version=plan.loaded_version, expected_version=plan.expected_version)
        if plan.action == NONE:
            self.reporter.event("noop", plan.reason, **fields)
            return EXIT_OK
        if plan.action == DEFER:
            self.reporter.event("deferred", f"deferred: {plan.reason}", "warning", reason=plan.reason,
                                holder_pids=[h.pid for h in plan.holders], holder_units=[h.unit for h in plan.holders if h.unit], **fields)
            return EXIT_DEFERRED
        if plan.action == REFUSE:
            self.reporter.event("refused", f"refused: {plan.reason}", "err", reason=plan.reason,
                                holder_pids=[h.pid for h in plan.holders], **fields)
            return EXIT_REFUSED
        stopped: list[str] = []
        try:
            if plan.stop_units:
                plan = self._stop_units(plan, stopped)
                if not plan.changes_kernel:
                    return self._execute(plan)  # deferred after all, or someone else swapped meanwhile
            self.reporter.event("plan", f"{plan.reason}: unload {' '.join(plan.unload) or 'nothing'}; "
                                        f"load {' '.join(s.name for s in plan.load)}", "notice",
                                modules=[s.name for s in plan.load], **fields)
            return self._swap(plan)
        finally:
            if stopped:
                self._start_units(stopped)

    def _stop_units(self, plan: Plan, stopped: list[str]) -> Plan:
        self.reporter.event("busy", f"stopping {', '.join(plan.stop_units)} to free the GPU", "notice",
                            holder_units=plan.stop_units, holder_pids=[h.pid for h in plan.holders])
        for unit in plan.stop_units:
            self._systemctl(["stop", unit])
            stopped.append(unit)
        replanned = make_plan(self.root, self.config, retry=self.retry)
        if replanned.stop_units or replanned.holders:
            return Plan(DEFER, f"the GPU is still in use after stopping {', '.join(stopped)}: "
                        + "; ".join(h.describe() for h in replanned.holders), replanned.expected_version,
                        replanned.loaded_version, replanned.running_kernel, replanned.config_kernel, holders=replanned.holders)
        return replanned

    def _start_units(self, units: list[str]) -> None:
        for unit in units:
            try:
                # --no-block: a unit ordered after ours would otherwise wait for us, and we for it.
                self._systemctl(["start", "--no-block", unit])
            except SwapFailed as e:
                self.reporter.event("failed", f"could not start {unit} again: {e}", "err")

    def _systemctl(self, args: list[str]) -> None:
        if self.run_systemctl is not None:
            self.run_systemctl(args)
            return
        for path in ("/run/current-system/sw/bin/systemctl", "/usr/bin/systemctl", "/bin/systemctl"):
            if os.access(path, os.X_OK):
                proc = subprocess.run([path, *args], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SwapFailed(f"systemctl {' '.join(args)}: {proc.stderr.strip()}")
                return
        raise SwapFailed("no systemctl binary found")

    def _swap(self, plan: Plan) -> int:
        self._step = 0
        state = {"format": 1, "plan": plan.to_json(), "rollback": _step_dicts(plan.rollback),
                 "load": _step_dicts(plan.load), "started": time.time()}
        try:
            for name in plan.prerequisites:
                self._record_step(state, "prerequisites", f"load {name} from the running kernel's tree")
                self.kernel.load_by_name(name)
            for name in plan.unload:
                self._record_step(state, "unloading", f"unload {name} {plan.loaded_version or ''}".strip())
                self.kernel.unload(name)
            for step in plan.load:
                self._record_step(state, "loading", f"load {step.path} {step.params}".strip())
                self.kernel.load(step.path, step.params)
            self._record_step(state, "verifying", "verify versions, device nodes and the verify command")
            self._verify(plan)
        except (KmodError, SwapFailed, OSError) as e:
            reason = str(e)
            self.reporter.event("failed", f"swap to {plan.expected_version} failed: {reason}; rolling back "
                                f"to {plan.loaded_version or 'no driver'}", "err", reason=reason)
            code = self._rollback(state, plan.rollback, reason)
            self._write(FAILED_RECORD, {"driver_version": plan.expected_version, "load": [s.path for s in plan.load],
                                        "reason": reason, "time": time.time()})
            return code
        self._finish(plan.load, plan.expected_version)
        (self.state_dir / FAILED_RECORD).unlink(missing_ok=True)
        self.reporter.event("swapped", f"NVIDIA driver {plan.expected_version} loaded"
                            + (f" (was {plan.loaded_version})" if plan.loaded_version else ""), "notice",
                            modules=[s.name for s in plan.load], loaded_version=plan.expected_version,
                            previous_version=plan.loaded_version)
        return EXIT_OK

    def _finish(self, load, version: str) -> None:
        self._write(LOADED_RECORD, {"driver_version": version, "modules": _step_dicts(load)})
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def _verify(self, plan: Plan) -> None:
        snapshot = read_snapshot(self.root)
        for step in plan.load:
            module = snapshot.modules.get(step.name)
            if module is None:
                raise SwapFailed(f"{step.name} is not loaded after loading it")
            if step.name.startswith("nvidia") and module.version != plan.expected_version:
                raise SwapFailed(f"{step.name} reports version {module.version}, expected {plan.expected_version}")
        problems = devices.wait_for_nodes(self.root, set(snapshot.modules), self.config.settle_timeout_s)
        if problems:
            raise SwapFailed(f"device nodes not ready after {self.config.settle_timeout_s:.0f}s: {'; '.join(problems)}")
        if self.config.verify_command:
            self._run_verify_command(plan.expected_version)

    def _run_verify_command(self, expected: str) -> None:
        argv = list(self.config.verify_command)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SwapFailed(f"verify command {argv[0]} could not run: {e}") from e
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or not lines or any(line != expected for line in lines):
            out = (proc.stdout + proc.stderr).strip().replace("\n", " | ")
            raise SwapFailed(f"verify command {' '.join(argv)} exited {proc.returncode} with {out!r}, expected {expected}")

    # -- rollback and recovery -------------------------------------------------------------------
    def _restore(self, rollback: list[dict]) -> None:
        """Unload whatever of the driver is loaded, then load the old modules back."""
        snapshot = read_snapshot(self.root)
        for name in unload_order(snapshot, snapshot.family()):
            self.kernel.unload(name)
        for step in rollback:
            self.kernel.load(step["path"], step.get("params", ""))
        if rollback:
            loaded = set(read_snapshot(self.root).modules)
            problems = devices.wait_for_nodes(self.root, loaded, self.config.settle_timeout_s)
            if problems:
                raise SwapFailed("; ".join(problems))

    def _rollback(self, state: dict, rollback, reason: str) -> int:
        steps = _step_dicts(rollback)
        state.update(phase="rolling-back", reason=reason)
        self._write(STATE_FILE, state)
        try:
            self._restore(steps)
        except (KmodError, SwapFailed, OSError) as e:
            self.reporter.event("rollback-failed", f"rollback failed: {e}. The NVIDIA driver is in an unknown state; "
                                f"the state is kept in {self.state_dir / STATE_FILE} and the next run retries", "crit",
                                reason=f"{reason}; rollback: {e}")
            return EXIT_ROLLBACK_FAILED
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        old = state.get("plan", {}).get("loaded_version")
        self.reporter.event("rolled-back", f"rolled back: the NVIDIA driver {old or '(none)'} is loaded again. "
                            f"Cause: {reason}", "err", reason=reason, loaded_version=old)
        return EXIT_ROLLED_BACK

    def _recover(self, state: dict) -> int:
        """A state file means a run died mid-swap. All new and verified: keep it. Otherwise: old."""
        plan = state.get("plan", {})
        snapshot = read_snapshot(self.root)
        expected = plan.get("expected_version")
        loaded_names = set(snapshot.modules)
        wanted = [s["name"] for s in state.get("load", [])]
        if (state.get("phase") == "verifying" and expected == self.config.driver_version
                and driver_modules_current(snapshot, self.config) and set(wanted) <= loaded_names):
            try:
                self._verify(Plan(plan.get("action", "swap"), "", expected, None, snapshot.kernel_release,
                                  self.config.kernel_release, load=tuple(LoadStep(**s) for s in state["load"])))
                self._finish(state["load"], expected)
                self.reporter.event("recovery", f"an interrupted swap to {expected} had completed; kept it", "warning")
                return EXIT_OK
            except (SwapFailed, OSError):
                pass
        self.reporter.event("recovery", f"an interrupted swap (at {state.get('phase')}, step {state.get('step')}) "
                            f"is rolled back to {plan.get('loaded_version') or 'no driver'}", "warning")
        return self._rollback(state, state.get("rollback", []), f"recovering from an interrupted swap at {state.get('phase')}")


def _step_dicts(steps) -> list[dict]:
    """LoadSteps of a plan, or the dicts a state file recorded of them, as dicts."""
    return [s if isinstance(s, dict) else asdict(s) for s in steps]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None
