"""Slurm as the gate of a swap (issue 25; docs/fleet.md): drain, swap once the node is idle,
resume. Decisions are slurm.py's; this runs scontrol through the effects boundary and journals.

- Before a swap (and while one waits for a busy GPU) the node is drained with a reason of ours,
  if the fleet's bound allows: running jobs finish, no new one starts.
- The swap runs only when slurmctld shows the drain and no job on the node.
- After a verified swap the node is resumed, only if the drain is still ours. A failed swap or
  verification leaves it drained, its reason saying why.
- A drain by an admin or by Slurm itself is never lifted; the swap may still run under it once the
  node has no job (no new one starts), and the journal says the drain was left alone.
- When slurmctld cannot be asked, the swap waits: a node that cannot be drained must not unload the
  driver under a job that starts meanwhile.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from .config import Config, SlurmConfig
from .effects import EffectError, Effects
from .journal import Reporter
from .rules import SLURM_DRAIN
from .slurm import (
    Node,
    SlurmError,
    admit,
    confirm,
    failed_reason,
    idle,
    limit_of,
    parse_nodes,
    says_failed,
    waiting_reason,
)
from .state import StateDir, StateError

__all__ = ["Gate", "SlurmGate", "gated"]

SCONTROL_TIMEOUT_S = 30.0


def gated(config: Config) -> Config:
    """The config a swap plans with once the node is drained and shows no job: Slurm's own units
    (slurmd holding NVML) may then be stopped for the swap and started again after it."""
    if config.slurm is None:
        return config
    units = tuple(dict.fromkeys((*config.stop_units, *config.slurm.units)))
    return config._replace(on_busy="stop-units", stop_units=units)


class Gate(NamedTuple):
    """The gate's answer for a swap: may it run now; if not, why (a deferral's reason)."""

    proceed: bool
    why: str


class SlurmGate:
    """This node's drain in slurmctld's state, for one run of the helper."""

    def __init__(self, config: SlurmConfig, effects: Effects, reporter: Reporter, state: StateDir,
                 sleep: Any = time.sleep) -> None:
        self.config, self.effects, self.reporter, self.state = config, effects, reporter, state
        self.sleep = sleep

    @classmethod
    def of(cls, config: Config, effects: Effects, reporter: Reporter, state: StateDir) -> SlurmGate | None:
        return None if config.slurm is None else cls(config.slurm, effects, reporter, state)

    @property
    def me(self) -> str:
        return self.config.node

    # -- slurmctld ---------------------------------------------------------------------------------
    def _scontrol(self, *args: str) -> str:
        argv = [self.config.scontrol, *args]
        try:
            code, out, err = self.effects.run_command(argv, SCONTROL_TIMEOUT_S)
        except EffectError as e:
            raise SlurmError(str(e)) from e
        if code != 0:
            raise SlurmError(f"{' '.join(argv)}: {err.strip() or out.strip() or f'exit {code}'}")
        return out

    def nodes(self) -> dict[str, Node]:
        # Every node: the bound counts the fleet's drains of ours from slurmctld's own state.
        return parse_nodes(self._scontrol("--oneliner", "show", "node"))

    def _limit(self, nodes: dict[str, Node]) -> int:
        return limit_of(self.config.max_unavailable, nodes, self.config.partition)

    def _drain(self, reason: str) -> None:
        self._scontrol("update", f"NodeName={self.me}", "State=DRAIN", f"Reason={reason}")
        try:
            self.state.write(SLURM_DRAIN, {"node": self.me, "reason": reason, "since": time.time()})
        except OSError:
            pass  # the reason in slurmctld's state is what counts; the record only wakes the no-op path

    def _resume(self) -> None:
        self._scontrol("update", f"NodeName={self.me}", "State=RESUME")
        self.state.remove(SLURM_DRAIN)

    # -- the gate --------------------------------------------------------------------------------
    def hold(self, loaded: str | None, expected: str) -> Gate:
        """Before a swap, or while one waits for the GPU: drain if the bound allows, and say whether
        the swap may run now. Never raises: slurmctld not answering is a reason to wait."""
        try:
            return self._hold(loaded, expected)
        except SlurmError as e:
            why = f"slurmctld could not be asked ({e}): the swap waits, the node cannot be drained"
            self.reporter.event("fleet", why, "warning", node=self.me)
            return Gate(False, why)

    def _hold(self, loaded: str | None, expected: str) -> Gate:
        nodes = self.nodes()
        limit = self._limit(nodes)
        decision = admit(nodes, self.me, limit)
        node = nodes[self.me]
        if decision.verdict == "drain":
            reason = waiting_reason(loaded, expected)
            self._drain(reason)
            self.reporter.event("drained", f"Slurm node {self.me} drained ({reason!r}; {decision.why}): running "
                                "jobs finish, no new job starts", "notice", node=self.me, reason=reason,
                                others=list(decision.others))
            # Nodes that drained in the same moment see each other only once all of them have.
            self.sleep(self.config.settle_s)
            nodes = self.nodes()
            decision = confirm(nodes, self.me, limit)
            if decision.verdict == "wait-fleet":
                self._resume()
                self.reporter.event("resumed", f"Slurm node {self.me} resumed: {decision.why}", "notice",
                                    node=self.me, others=list(decision.others))
                return Gate(False, f"the fleet's bound: {decision.why}")
            node = nodes[self.me]
            decision = idle(node) or decision
        elif node.ours and not node.failed and node.reason != waiting_reason(loaded, expected):
            # Drained for an earlier bump that another one overtook: the reason names this one.
            self._drain(waiting_reason(loaded, expected))
        elif node.drained and not node.ours:
            self.reporter.event("fleet", f"Slurm node {node.shown()} was drained by another hand: left as it is, "
                                "and not resumed after the swap", "notice", node=self.me, reason=node.reason)
        match decision.verdict:
            case "proceed":
                return Gate(True, decision.why)
            case "wait-fleet":
                return Gate(False, f"the fleet's bound: {decision.why}")
            case _:
                return Gate(False, decision.why)

    def ready(self) -> Gate:
        """For the timer, read-only: could the swap run now (no job on the node, and a drain in
        place or allowed)? Not while slurmctld cannot be asked: the swap unit's run would only
        defer again (hold)."""
        try:
            nodes = self.nodes()
            decision = admit(nodes, self.me, self._limit(nodes))
        except SlurmError as e:
            return Gate(False, str(e))
        return Gate(decision.verdict in ("proceed", "drain"), decision.why)

    # -- after the swap ----------------------------------------------------------------------------
    def release(self, why: str) -> None:
        """The new driver is loaded and verified (or nothing is left to swap): give our drain back.
        A drain by another hand, or one of ours that says a swap failed while nothing was
        swapped, stays."""
        try:
            node = self.nodes().get(self.me)
            if node is None or not node.drained:
                self.state.remove(SLURM_DRAIN)
                return
            if not node.ours:
                self.reporter.event("fleet", f"Slurm node {node.shown()} stays drained: not drained by "
                                    "nvidia-kmod-swap", "notice", node=self.me, reason=node.reason)
                self.state.remove(SLURM_DRAIN)
                return
            if not node.registered:
                # slurmctld restarted and slurmd has not registered again: a RESUME now would lift
                # the drain and fail (slurm.Node.registered). The retry timer asks again.
                self.reporter.event("fleet", f"Slurm node {node.shown()} stays drained until slurmd registers with "
                                    "slurmctld again; the retry timer resumes it then", "notice", node=self.me)
                return
            self._resume()
        except SlurmError as e:
            self.reporter.event("fleet", f"could not resume Slurm node {self.me} ({e}): the next run tries again; "
                                f"by hand: scontrol update NodeName={self.me} State=RESUME", "err", node=self.me)
            return
        self.reporter.event("resumed", f"Slurm node {self.me} resumed: {why}", "notice", node=self.me,
                            reason=node.reason)

    def fail(self, loaded: str | None, expected: str, why: str) -> None:
        """A swap or its verification failed: the node stays drained (drained now if it was not),
        its reason saying why; never resumed onto a driver that failed. A drain by another hand
        keeps its reason."""
        reason = failed_reason(loaded, expected, why)
        try:
            node = self.nodes().get(self.me)
            if node is not None and node.drained and not node.ours:
                self.reporter.event("fleet", f"Slurm node {node.shown()} stays drained by another hand; the failed "
                                    "swap is in this journal only", "warning", node=self.me)
                return
            self._drain(reason)
        except SlurmError as e:
            self.reporter.event("fleet", f"could not mark Slurm node {self.me} drained as failed ({e}); its reason "
                                f"should say: {reason}", "err", node=self.me)
            return
        self.reporter.event("drained", f"Slurm node {self.me} left drained: {reason!r}", "err", node=self.me,
                            reason=reason)

    def drain_failed(self) -> bool:
        """Our drain record (written by _drain) says a swap failed; read locally, not from slurmctld."""
        try:
            record = self.state.read(SLURM_DRAIN)
        except StateError:
            return False  # settle() reads slurmctld's own state
        return isinstance(record, dict) and says_failed(str(record.get("reason", "")))

    def settle(self) -> None:
        """Nothing to swap (the loaded driver is the profile's: a swap done by another run, or the
        profile went back): a drain of ours that waited for a swap is given back; one that says a
        swap failed stays for an admin to read."""
        if not self.state.exists(SLURM_DRAIN):
            return
        try:
            node = self.nodes().get(self.me)
        except SlurmError as e:
            self.reporter.event("fleet", f"could not read Slurm node {self.me} ({e}): the next run tries again",
                                "warning", node=self.me)
            return
        if node is not None and node.failed:
            self.reporter.event("fleet", f"Slurm node {node.shown()} stays drained: a swap failed; resume it by hand "
                                f"once read (scontrol update NodeName={self.me} State=RESUME)", "warning",
                                node=self.me, reason=node.reason)
            self.state.remove(SLURM_DRAIN)
            return
        self.release("nothing is left to swap: the loaded driver is this generation's")

