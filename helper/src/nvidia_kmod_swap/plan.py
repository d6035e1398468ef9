"""What to do, as pure functions: snapshot + config + module files -> a Plan, or a reason not to act.

Nothing here reads files or touches the kernel; the caller gathers the facts (snapshot, module
inventories, parameters, GPU holders) and `swap` carries the plan out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config
from .holders import Holder
from .modinfo import ModInfo
from .snapshot import Snapshot

NONE, LOAD, SWAP, DEFER, REFUSE = "none", "load", "swap", "defer", "refuse"


@dataclass(frozen=True)
class Candidate:
    """A module file found on disk: what it parsed to, or why it could not be read."""

    path: Path
    resolved: Path
    info: ModInfo | None = None
    error: str | None = None


Inventory = dict[str, list[Candidate]]  # kernel module name -> files, in search order


@dataclass(frozen=True)
class LoadStep:
    name: str
    path: str
    params: str = ""


@dataclass(frozen=True)
class Plan:
    action: str
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
    notes: tuple[str, ...] = field(default=())

    @property
    def changes_kernel(self) -> bool:
        return self.action in (LOAD, SWAP)

    def to_json(self) -> dict:
        data = asdict(self)
        data["load"] = [asdict(step) for step in self.load]
        data["rollback"] = [asdict(step) for step in self.rollback]
        data["holders"] = [asdict(h) for h in self.holders]
        return data


def _base(snapshot: Snapshot, config: Config) -> dict:
    return dict(expected_version=config.driver_version, loaded_version=snapshot.version("nvidia"),
                running_kernel=snapshot.kernel_release, config_kernel=config.kernel_release)


def driver_modules_current(snapshot: Snapshot, config: Config) -> bool:
    """Every loaded NVIDIA module carries the expected version (nvidia itself must be loaded)."""
    if snapshot.version("nvidia") is None:
        return False
    return all(m.version == config.driver_version for name, m in snapshot.modules.items()
               if name.startswith("nvidia") and m.version is not None)


def triage(snapshot: Snapshot, config: Config) -> Plan | None:
    """The decisions that need no module files: nothing to do, or a kernel that changed.

    Returns None when a load or swap is wanted and the files must be looked at.
    """
    base = _base(snapshot, config)
    if driver_modules_current(snapshot, config):
        reason = f"loaded NVIDIA driver {config.driver_version} matches the system profile"
        if config.kernel_release != snapshot.kernel_release:
            reason += f"; kernel {config.kernel_release} is waiting for a reboot"
        return Plan(NONE, reason, **base)
    if config.kernel_release != snapshot.kernel_release:
        what = (f"loaded NVIDIA driver is {base['loaded_version']}" if base["loaded_version"]
                else "no NVIDIA driver is loaded")
        reason = (f"{what}, the profile has {config.driver_version} built for kernel {config.kernel_release}, "
                  f"but kernel {snapshot.kernel_release} is running: a reboot is required")
        return Plan(DEFER if config.on_kernel_change == "defer" else REFUSE, reason, **base)
    return None


def unload_order(snapshot: Snapshot, names: list[str]) -> list[str]:
    """Users before what they use: a topological sort of the live holder graph (ties by name)."""
    remaining = set(names)
    order: list[str] = []
    while remaining:
        ready = sorted(n for n in remaining if not (snapshot.modules[n].holders & remaining))
        if not ready:
            raise ValueError(f"holder cycle among {sorted(remaining)}")
        order.extend(ready)
        remaining -= set(ready)
    return order


def load_order(infos: dict[str, ModInfo]) -> list[str]:
    """Dependencies before their users, following each file's `depends` (ties by name)."""
    remaining = set(infos)
    order: list[str] = []
    while remaining:
        ready = sorted(n for n in remaining if not (set(infos[n].depends) & remaining))
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(remaining)}")
        order.extend(ready)
        remaining -= set(ready)
    return order


def _allowed(path: Path, prefixes: tuple[str, ...]) -> bool:
    text = str(path)
    return any(text.startswith(p) if p.endswith("/") else (text == p or text.startswith(p + "/")) for p in prefixes)


def check_new_module(name: str, candidates: list[Candidate], config: Config, running: str) -> tuple[ModInfo | None, str | None]:
    """The file to load for NAME from the new driver, or why there is none that may be loaded."""
    if not candidates:
        return None, (f"{name} is needed but no {name.replace('_', '-')}.ko(.xz/.zst) was found in "
                      f"{', '.join(config.module_dirs)}")
    candidate = candidates[0]
    if not _allowed(candidate.resolved, config.allowed_prefixes):
        return None, (f"{candidate.path} resolves to {candidate.resolved}, outside the allowed prefixes "
                      f"{', '.join(config.allowed_prefixes)}")
    if candidate.info is None:
        return None, f"cannot use {candidate.path}: {candidate.error}"
    info = candidate.info
    if info.kernel_release != running:
        return None, f"{candidate.path} was built for kernel {info.kernel_release}, not the running {running} (vermagic)"
    if name.startswith("nvidia") and info.version != config.driver_version:
        return None, (f"{candidate.path} has version {info.version}, but the profile's driver is "
                      f"{config.driver_version}")
    return info, None


def find_rollback(name: str, snapshot: Snapshot, candidates: list[Candidate], config: Config) -> ModInfo | None:
    """A file of the module that is loaded now: same srcversion (or, lacking one, same version)."""
    loaded = snapshot.modules[name]
    for candidate in candidates:
        info = candidate.info
        if info is None or info.kernel_release != snapshot.kernel_release:
            continue
        if not _allowed(candidate.resolved, config.allowed_prefixes):
            continue
        if loaded.srcversion and info.srcversion:
            if loaded.srcversion == info.srcversion:
                return info
        elif loaded.version is not None and info.version == loaded.version:
            return info
    return None


def _ships(dep: str, new: Inventory, snapshot: Snapshot, config: Config) -> bool:
    """Whether a dependency of a new module is part of the new driver rather than of the kernel.

    The module dirs may be a whole NixOS module tree (system.modulesTree: the kernel's own modules
    beside the driver's), so being found there says nothing. A loaded module outside the NVIDIA
    family (drm) stays as it is; otherwise the new driver ships DEP when its file carries the
    driver's version, or is named nvidia* (then check_new_module insists on the version).
    """
    if dep in snapshot.modules and dep not in snapshot.family():
        return False
    candidates = new.get(dep, [])
    if not candidates:
        return False
    info = candidates[0].info
    return dep.startswith("nvidia") or (info is not None and info.version == config.driver_version)


def _kernel_users(snapshot: Snapshot, family: list[str]) -> list[str]:
    """Modules whose refcount is not explained by the modules holding them (open files, fbcon, ...)."""
    return [f"{n} (refcount {snapshot.modules[n].refcnt}, {len(snapshot.modules[n].holders)} holder modules)"
            for n in family if snapshot.modules[n].refcnt > len(snapshot.modules[n].holders)]


def plan_change(snapshot: Snapshot, config: Config, new: Inventory, old: Inventory,
                params: dict[str, str], holders: list[Holder], soft: tuple[str, ...] = ()) -> Plan:
    """Plan a load (nothing loaded) or a swap (another version loaded); refuse or defer otherwise."""
    base = _base(snapshot, config)
    running = snapshot.kernel_release
    family = snapshot.family()
    action = SWAP if family else LOAD

    # What must be loaded afterwards: what is loaded now, the configured set, and their dependencies.
    # Soft dependencies (modprobe.d softdep, e.g. nvidia -> nvidia_uvm) are optional, as for
    # modprobe: loaded when the new driver ships them, skipped otherwise.
    wanted = list(dict.fromkeys(family + list(config.modules)
                                + [d for d in soft if _ships(d, new, snapshot, config)]))
    infos: dict[str, ModInfo] = {}
    problems: list[str] = []
    todo = list(wanted)
    while todo:
        name = todo.pop(0)
        if name in infos:
            continue
        info, problem = check_new_module(name, new.get(name, []), config, running)
        if problem:
            problems.append(problem)
            continue
        infos[name] = info
        # A dependency the new driver ships comes from the new driver; any other belongs to the kernel.
        todo.extend(dep for dep in info.depends if dep not in infos and _ships(dep, new, snapshot, config))
    if problems:
        return Plan(REFUSE, "the new driver's modules cannot be loaded: " + "; ".join(problems)
                    + ". Nothing was unloaded; the loaded driver keeps running", **base)

    # Modules the new ones need that belong to the running kernel (drm, drm_kms_helper, ...).
    prerequisites = sorted({dep for info in infos.values() for dep in info.depends
                            if dep not in infos and dep not in snapshot.modules})

    rollback: list[LoadStep] = []
    if family:
        missing = []
        rollback_infos: dict[str, ModInfo] = {}
        for name in family:
            info = find_rollback(name, snapshot, old.get(name, []), config)
            if info is None:
                loaded = snapshot.modules[name]
                missing.append(f"{name} {loaded.version or ''}".strip())
            else:
                rollback_infos[name] = info
        if missing:
            return Plan(REFUSE, (f"no file of the loaded module(s) {', '.join(missing)} was found in the rollback "
                                 f"directories ({', '.join(config.rollback_dirs) or 'none configured'}): a failed swap "
                                 f"could not be undone, so nothing was changed"), **base)
        rollback = [LoadStep(n, str(rollback_infos[n].path), params.get(n, "")) for n in load_order(rollback_infos)]

    load = tuple(LoadStep(n, str(infos[n].path), params.get(n, "")) for n in load_order(infos))
    unload = tuple(unload_order(snapshot, family))
    loaded = base["loaded_version"]
    change = (f"swap NVIDIA driver {loaded} -> {config.driver_version}" if action == SWAP
              else f"load NVIDIA driver {config.driver_version}")

    if action == SWAP:
        procs, unexplained = holders, _kernel_users(snapshot, family)
        if procs or unexplained:
            who = [h.describe() for h in procs] or [f"kernel users of {', '.join(unexplained)}"]
            units = sorted({h.unit for h in procs if h.unit})
            # Stopping units can only help when processes hold the GPU; swap re-checks after stopping them.
            stoppable = (config.on_busy == "stop-units" and procs
                         and all(h.unit in config.stop_units for h in procs))
            if stoppable:
                return Plan(SWAP, f"{change}, stopping {', '.join(units)} which hold the GPU",
                            unload=unload, load=load, rollback=tuple(rollback), prerequisites=tuple(prerequisites),
                            holders=tuple(procs), stop_units=tuple(units), **base)
            reason = f"cannot {change}: the GPU is in use: {'; '.join(who)}"
            if config.on_busy == "stop-units":
                outside = sorted({h.unit or f'pid {h.pid}' for h in procs if h.unit not in config.stop_units})
                reason += f" ({', '.join(outside) or 'kernel users'} not in stop_units)"
            if config.on_busy == "fail":
                return Plan(REFUSE, reason, holders=tuple(procs), **base)
            return Plan(DEFER, reason + ". The loaded driver stays until they stop", holders=tuple(procs), **base)

    return Plan(action, change, unload=unload, load=load, rollback=tuple(rollback),
                prerequisites=tuple(prerequisites), **base)


def refuse_repeat(plan: Plan, failure: dict | None, record_path: str) -> Plan:
    """Don't retry a swap that already failed with the very same files.

    nvidia-persistenced has Restart=always: without this, a bad new driver would be swapped in and
    rolled back again on every restart, taking the GPU away each time.
    """
    if not plan.changes_kernel or not failure:
        return plan
    if failure.get("driver_version") != plan.expected_version or failure.get("load") != [s.path for s in plan.load]:
        return plan
    return Plan(REFUSE, (f"a swap to {plan.expected_version} with these module files already failed and was "
                         f"rolled back ({failure.get('reason', 'no reason recorded')}); not retrying it on every "
                         f"restart. Retry with `nvidia-kmod-swap swap --retry` or remove {record_path}"),
                plan.expected_version, plan.loaded_version, plan.running_kernel, plan.config_kernel)
