"""The typed records and vocabularies the planner, the state records and the orchestration all
stand on (as nixos-rebuild-ng keeps its models in models.py): a plan's steps, the plan itself, the
outcome a procedure of swap.py returns, and the words each of them may use.

Records are typing.NamedTuple: immutable, equal and hashed by value, and cheap to define (no
dataclasses on the helper's paths: docs/performance.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

if TYPE_CHECKING:
    from .holders import Holder
    from .modinfo import ModInfo
    from .snapshot import LoadedModule

Action = Literal["none", "load", "swap", "defer", "refuse"]
NONE: Final = "none"      # the loaded driver is the profile's
LOAD: Final = "load"      # no driver loaded: load the profile's
SWAP: Final = "swap"      # another driver loaded: unload it, load the profile's
DEFER: Final = "defer"    # not now: the GPU is busy (waits for "idle") or the kernel changed ("reboot")
REFUSE: Final = "refuse"  # not this: what it would do cannot be done safely

Direction = Literal["install", "upgrade", "downgrade", "reinstall", ""]
WaitsFor = Literal["idle", "reboot", ""]
# Where a swap is (swap.json's `phase`): what a crash recovery reads.
Phase = Literal["planned", "prerequisites", "stopping-units", "unloading", "loading", "verifying", "rolling-back"]
# The journal's events (journal.MESSAGE_IDS) and priorities.
Event = Literal["noop", "plan", "deferred", "refused", "step", "swapped", "failed", "rolled-back", "rollback-failed",
                "recovery", "busy", "retry", "pinned", "unpinned", "unpinnable", "drained", "resumed", "fleet"]
Priority = Literal["debug", "info", "notice", "warning", "err", "crit"]


class LoadStep(NamedTuple):
    """One module file to load, with its parameters and what its .modinfo says."""

    name: str
    path: str
    params: str = ""
    version: str | None = None      # what the file says: a rollback checks sysfs against these
    srcversion: str | None = None
    # Its .modinfo depends, so that what the swap read once is not read again afterwards (a real
    # nvidia.ko.xz is 42 MB to decompress); None: not known (a record written before this field).
    depends: tuple[str, ...] | None = None

    def matches(self, loaded: LoadedModule | None) -> bool:
        """The loaded module is this file's: same version and, where both have one, srcversion."""
        if loaded is None or loaded.version != self.version:
            return False
        return not (loaded.srcversion and self.srcversion) or loaded.srcversion == self.srcversion

    @classmethod
    def of(cls, info: ModInfo, params: str) -> LoadStep:
        return cls(info.name, str(info.path), params, info.version, info.srcversion, info.depends)


class Plan(NamedTuple):
    """What a swap would do now (action, unloads, loads, rollback) and why: plan_change's decision."""

    action: Action
    reason: str
    expected_version: str
    loaded_version: str | None
    running_kernel: str
    config_kernel: str
    unload: tuple[str, ...] = ()
    load: tuple[LoadStep, ...] = ()
    rollback: tuple[LoadStep, ...] = ()
    prerequisites: tuple[str, ...] = ()   # modules outside the driver that must be loaded by name first
    holders: tuple[Holder, ...] = ()
    stop_units: tuple[str, ...] = ()
    direction: Direction = ""  # install, upgrade, downgrade (a rollback generation) or "" (no change)
    waits_for: WaitsFor = ""  # what a deferral waits for: the GPU's users, or a new kernel
    notes: tuple[str, ...] = ()  # what the swap does not stop for but says (an option no module declares)

    @property
    def changes_kernel(self) -> bool:
        return self.action in (LOAD, SWAP)

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["load"] = [step._asdict() for step in self.load]
        data["rollback"] = [step._asdict() for step in self.rollback]
        data["holders"] = [h._asdict() for h in self.holders]
        return data


class Outcome(NamedTuple):
    """What a procedure of swap.py ended with: the exit code, and the one journal entry that says
    so (event, message, priority, fields), which Swapper.run reports in one place."""

    code: int
    event: Event
    message: str
    priority: Priority = "info"
    fields: dict[str, Any] | None = None
    origin: tuple[str, int, str] | None = None  # (file, line, function) where it was decided
