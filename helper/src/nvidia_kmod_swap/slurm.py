"""Slurm as the gate of a swap on a GPU node of a fleet (issue 25; docs/fleet.md): pure.

Slurm already has what a rolling driver update needs: a drained node runs its jobs to the end and
starts no new ones (`scontrol update NodeName=... State=DRAIN Reason=...`), and `State=RESUME`
gives it back. This module reads slurmctld's view of the nodes (`scontrol --oneliner show node`)
and decides; fleet.py runs scontrol through the effects boundary.

A drain of ours is told by its reason, which starts with REASON_PREFIX: slurmctld keeps the reason
with the node, so every node of the fleet counts the same drains from the same source, and a drain
by an admin or by Slurm itself (another reason) is never lifted by us.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

__all__ = ["REASON_PREFIX", "Decision", "Node", "SlurmError", "admit", "confirm", "failed_reason", "idle",
           "limit_of", "parse_nodes", "says_failed", "waiting_reason"]

REASON_PREFIX = "nvidia-kmod-swap:"
# slurmctld's node states that mean a job is (still) on the node (src/common/slurm_protocol_defs.c
# node_state_string: ALLOCATED, MIXED; COMPLETING is a flag while a job's epilog runs).
JOB_STATES = frozenset({"ALLOCATED", "MIXED", "COMPLETING"})
# A reason of ours is kept short: slurmctld stores any length, but `sinfo -R` and admins read it.
REASON_MAX = 200


class SlurmError(Exception):
    """slurmctld could not be asked, or answered something this module cannot read."""


class Node(NamedTuple):
    """One node as slurmctld shows it (`scontrol --oneliner show node`)."""

    name: str
    states: tuple[str, ...]      # State=IDLE+DRAIN -> ("IDLE", "DRAIN"); the base state first
    reason: str                  # without its " [user@time]" suffix
    reason_user: str
    reason_time: str             # as scontrol printed it (SLURM_TIME_FORMAT)
    partitions: tuple[str, ...]

    @property
    def drained(self) -> bool:
        """DRAIN is set: running jobs go on, no new job starts (DRAINING or DRAINED)."""
        return "DRAIN" in self.states

    @property
    def has_jobs(self) -> bool:
        return any(s in JOB_STATES for s in self.states)

    @property
    def registered(self) -> bool:
        """slurmctld has heard from the node's slurmd since it started. Until then the base state
        is UNKNOWN, even with jobs running there (read_config.c _sync_nodes_to_active_job counts
        them; validate_node_specs sets ALLOCATED at registration), and a RESUME lifts DRAIN yet
        fails, "Invalid node state specified" (node_mgr.c update_node, Slurm 22.05 to 25.05)."""
        return self.states[:1] != ("UNKNOWN",)

    @property
    def ours(self) -> bool:
        return self.drained and self.reason.startswith(REASON_PREFIX)

    @property
    def failed(self) -> bool:
        return self.ours and says_failed(self.reason)

    def shown(self) -> str:
        state = "+".join(self.states)
        if not self.reason:
            return f"{self.name} ({state})"
        by = f" by {self.reason_user}" if self.reason_user else ""
        return f"{self.name} ({state}{by}: {self.reason!r})"


# `Reason=<text> [<user>@<time>]` (src/api/node_info.c prints the reason with its user and time),
# and it may be followed by other fields; a reason itself has spaces.
_REASON = re.compile(r"(?:^|\s)Reason=(.*?) \[([^\]@\s]*)@([^\]]*)\](?=\s|$)")
_FIELD = re.compile(r"(?:^|\s)(NodeName|State|Partitions)=(\S*)")


def parse_nodes(text: str) -> dict[str, Node]:
    """name -> Node, from `scontrol --oneliner show node` (one node per line)."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        fields = dict(_FIELD.findall(line))
        name = fields.get("NodeName")
        if not name:
            continue
        reason = _REASON.search(line)
        states = tuple(s for s in fields.get("State", "").split("+") if s)
        # A node that does not answer is marked with a "*" after its state in sinfo, not here;
        # scontrol prints NOT_RESPONDING as a flag of its own.
        partitions = tuple(p for p in fields.get("Partitions", "").split(",") if p)
        nodes[name] = Node(name, states, reason.group(1) if reason else "", reason.group(2) if reason else "",
                           reason.group(3) if reason else "", partitions)
    return nodes


def limit_of(spec: str, nodes: dict[str, Node], partition: str | None) -> int:
    """How many nodes may be drained by us at once: SPEC is a count ("2") or a percentage ("25%")
    of PARTITION's nodes (of every node without one), rounded up, at least 1 (as the GPU
    Operator's maxUnavailable: k8s-operator-libs scales a percentage with rounding up)."""
    if spec.endswith("%"):
        members = [n for n in nodes.values() if partition is None or partition in n.partitions]
        return max(1, -(-int(spec[:-1]) * len(members) // 100))
    return int(spec)


Verdict = Literal["proceed", "drain", "wait-jobs", "wait-fleet"]


class Decision(NamedTuple):
    """What the gate does now, and why (said in the journal)."""

    verdict: Verdict
    why: str
    others: tuple[str, ...] = ()  # the other nodes drained by us, as counted


def _ours_elsewhere(nodes: dict[str, Node], me: str) -> list[Node]:
    return [n for n in nodes.values() if n.ours and n.name != me]


def admit(nodes: dict[str, Node], me: str, limit: int) -> Decision:
    """Before a swap: may this node swap now, must it drain first, or wait (for its jobs, or for
    the fleet's bound)? A drain by another hand is respected as it is: no new job starts, so the
    swap may run once the jobs are gone; it does not count against the bound (it was not ours)."""
    node = nodes.get(me)
    if node is None:
        raise SlurmError(f"slurmctld knows no node {me!r}")
    others = tuple(n.name for n in _ours_elsewhere(nodes, me))
    if not node.drained:
        if len(others) >= limit:
            return Decision("wait-fleet", f"{len(others)} other node(s) are drained by nvidia-kmod-swap "
                            f"({', '.join(others)}), the most maxUnavailable ({limit}) allows", others)
        return Decision("drain", f"{len(others)} other node(s) drained by nvidia-kmod-swap, "
                        f"maxUnavailable {limit}", others)
    return idle(node, others) or Decision("proceed", f"{node.shown()} has no job", others)


def idle(node: Node, others: tuple[str, ...] = ()) -> Decision | None:
    """None if slurmctld shows no job on NODE; else why the swap waits for its jobs."""
    if not node.registered:
        return Decision("wait-jobs", f"slurmctld has not heard from slurmd on {node.shown()} since it started: "
                        "its jobs are not known yet", others)
    if node.has_jobs:
        return Decision("wait-jobs", f"Slurm jobs still run on {node.shown()}; no new one starts", others)
    return None


def confirm(nodes: dict[str, Node], me: str, limit: int) -> Decision:
    """After our drain, read again once the settle time has passed: nodes that drained at the same
    moment all see each other now, and rank the drains of ours alike, by slurmctld's reason time,
    then name. The first LIMIT keep theirs; the others give theirs back (a drain of a moment costs
    no job) and wait for the next try."""
    ranked = sorted((n for n in nodes.values() if n.ours), key=lambda n: (n.reason_time, n.name))
    names = [n.name for n in ranked]
    if me not in names:
        raise SlurmError(f"our drain of {me} is not in slurmctld's state (someone changed it meanwhile)")
    others = tuple(n for n in names if n != me)
    if names.index(me) < limit:
        return Decision("proceed", f"drained; {names.index(me) + 1} of {len(names)} drained by nvidia-kmod-swap, "
                        f"maxUnavailable {limit}", others)
    return Decision("wait-fleet", f"{', '.join(names[:limit])} drained first and maxUnavailable is {limit}: our drain "
                    "is given back", others)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def says_failed(reason: str) -> bool:
    """REASON is ours and says a swap failed (failed_reason)."""
    return reason.startswith(f"{REASON_PREFIX} failed")


def waiting_reason(loaded: str | None, expected: str) -> str:
    return _short(f"{REASON_PREFIX} NVIDIA driver {loaded or 'none'} -> {expected}")


def failed_reason(loaded: str | None, expected: str, why: str) -> str:
    return _short(f"{REASON_PREFIX} failed {loaded or 'none'} -> {expected}: {why}")
