"""What to do, as pure functions: snapshot + config + module files -> a Plan, or a reason not to act.

Nothing here reads files or touches the kernel; the caller (facts.py) gathers the facts (snapshot,
module inventories, parameters, GPU holders) and swap.py carries the plan out.

Which loaded modules are the driver is decided by content, not by name: the swap unloads `nvidia`
and every module holding it; of those, the ones the new driver tree ships with the driver's version
are driver modules (loaded from the new driver, version checked), the others are holders (nvidia_fs:
reloaded from a build in the module dirs, their own version). Modules outside that closure
(nvidia_wmi_ec_backlight, nvidia_cspmu) are left alone.
"""

from __future__ import annotations

import graphlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from .config import Config
from .holders import Holder
from .models import DEFER, LOAD, NONE, REFUSE, SWAP, Action, Direction, LoadStep, Plan
from .modinfo import ModInfo
from .rules import CORE, stale
from .snapshot import LoadedModule, Snapshot

__all__ = ["DEFER", "LOAD", "NONE", "REFUSE", "SWAP", "Candidate", "Inventory", "LoadStep", "Plan", "Restore",
           "changed_since", "deferral_step", "direction", "plan_change", "plan_restore", "refuse_repeat",
           "restore_problems", "triage", "unload_order"]

class Candidate(NamedTuple):
    """A module file found on disk: what it parsed to, or why it could not be read."""

    path: Path
    resolved: Path
    info: ModInfo | None = None
    error: str | None = None
    top: str = ""  # the module directory it was found in


Inventory = dict[str, list[Candidate]]  # kernel module name -> files, in search order



# What holds a driver module when no process has /dev/nvidia* or an NVIDIA DRM node open, in
# words a user can act on.
KERNEL_REFERENCES = {
    "nvidia_drm": ("the framebuffer console on the NVIDIA GPU (nvidia_drm.fbdev=1) or another in-kernel DRM client: "
                   "move the console off it (echo 0 > /sys/class/vtconsole/vtcon<N>/bind for the vtcon named after "
                   "the NVIDIA framebuffer) or boot with nvidia_drm.fbdev=0"),
    "nvidia_vgpu_vfio": "a vGPU mediated device is open (a virtual machine uses it): shut the VM down",
    "nvidia_modeset": "nvidia_drm's display state or the X server's NVIDIA driver",
    "nvidia_uvm": "another kernel module's or an RDMA/peer-memory user's references to CUDA memory",
    "nvidia": "another driver's references (a VFIO, peer-memory or display client in the kernel)",
}


def explain_kernel_references(module: LoadedModule) -> str:
    """'nvidia_drm has 1 reference(s) from the kernel, not from a process: <what and what to do>'."""
    what = KERNEL_REFERENCES.get(module.name, "kernel code that is not a process (no open device file)")
    return f"{module.name} has {module.kernel_users} reference(s) from the kernel, not from a process: {what}"


def q(value: object) -> str:
    """A value read from a file, quoted so that stray bytes and newlines show."""
    return repr(value)


def direction(loaded: str | None, expected: str) -> Direction:
    """install (nothing loaded), upgrade or downgrade, by PEP 440 ordering (packaging), which
    orders NVIDIA's N.N.N releases numerically (570.133.07 > 570.86.16). ValueError naming the
    version that is not one: such a driver is refused rather than guessed at."""
    from packaging.version import InvalidVersion, Version

    def parse(what: str, value: str) -> Version:
        try:
            if value != value.strip():
                raise InvalidVersion(value)
            return Version(value)
        except InvalidVersion:
            raise ValueError(f"the {what} version {q(value)} is not a version number") from None

    new = parse("profile's driver", expected)
    if loaded is None:
        return "install"
    old = parse("loaded driver", loaded)
    return "upgrade" if new > old else "downgrade" if new < old else "reinstall"


def _base(snapshot: Snapshot, config: Config) -> dict[str, Any]:
    return dict(expected_version=config.driver_version, loaded_version=snapshot.version(CORE),
                running_kernel=snapshot.kernel_release, config_kernel=config.kernel_release)


def stale_modules(snapshot: Snapshot, config: Config) -> list[str]:
    """Modules of nvidia's closure whose version is not the profile's (rules.stale, as quick.py)."""
    return stale(config.driver_version, {n: snapshot.modules[n].version for n in snapshot.family()})


def driver_current(snapshot: Snapshot, config: Config, foreign: Iterable[str] = ()) -> bool:
    """nvidia is loaded at the profile's version and every other module of its closure either has
    that version too or is FOREIGN (a holder with a version of its own: the new tree does not ship
    it with the driver's version)."""
    if snapshot.version(CORE) != config.driver_version:
        return False
    return set(stale_modules(snapshot, config)) <= set(foreign)


def kernel_change(snapshot: Snapshot, config: Config) -> str | None:
    """Why the profile's modules cannot be loaded into the running kernel, or None: another
    release, or the same release rebuilt (another kernel image than the booted one: a config or
    patch change keeps modDirVersion, and its modules need not fit the running kernel's symbols)."""
    if config.kernel_release != snapshot.kernel_release:
        return f"built for kernel {config.kernel_release}, but kernel {snapshot.kernel_release} is running"
    if config.kernel_image and snapshot.booted_kernel_image and config.kernel_image != snapshot.booted_kernel_image:
        return (f"built for the kernel {config.kernel_image}, but the machine booted {snapshot.booted_kernel_image} "
                f"(the same release {config.kernel_release}, rebuilt)")
    return None


def triage(snapshot: Snapshot, config: Config, foreign: Iterable[str] = ()) -> Plan | None:
    """The decisions that need no module files beyond FOREIGN: nothing to do, a kernel that changed,
    or a kernel that refuses module changes. None when a load or swap is wanted."""
    base = _base(snapshot, config)
    changed = kernel_change(snapshot, config)
    if driver_current(snapshot, config, foreign):
        reason = f"loaded NVIDIA driver {config.driver_version} matches the system profile"
        if changed:
            waiting = (config.kernel_release if config.kernel_release != snapshot.kernel_release
                       else f"{config.kernel_release} (rebuilt: {config.kernel_image})")
            reason += f"; kernel {waiting} is waiting for a reboot"
        return Plan(NONE, reason, **base)
    what = (f"loaded NVIDIA driver is {q(base['loaded_version'])}" if base["loaded_version"]
            else "no NVIDIA driver is loaded")
    if changed:
        reason = f"{what}, the profile has {config.driver_version} {changed}: a reboot is required"
        return Plan(DEFER if config.on_kernel_change == "defer" else REFUSE, reason, waits_for="reboot", **base)
    try:
        direction(base["loaded_version"], config.driver_version)
    except ValueError as e:
        return Plan(REFUSE, f"{e}; nothing was changed", **base)
    if snapshot.modules_disabled:
        return Plan(REFUSE, (f"{what} and the profile has {config.driver_version}, but module loading is "
                             f"disabled (/proc/sys/kernel/modules_disabled = 1; NixOS "
                             f"security.lockKernelModules): the kernel refuses every unload and load until "
                             f"reboot, so nothing was tried. The new driver loads at the next boot"), **base)
    return None


def _order(graph: dict[str, set[str]], what: str) -> list[str]:
    """A topological order of GRAPH (node -> what must come before it), ties by name."""
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        raise ValueError(f"{what} cycle among {sorted(set(e.args[1]))}") from e
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order.extend(ready)
        sorter.done(*ready)
    return order


def unload_order(snapshot: Snapshot, names: Iterable[str]) -> list[str]:
    """Users before what they use, by the live holder graph."""
    chosen = set(names)
    return _order({n: set(snapshot.modules[n].holders & chosen) for n in chosen}, "holder")


def load_order(infos: dict[str, ModInfo]) -> list[str]:
    """Dependencies before their users, by each file's `depends`."""
    return _order({n: set(infos[n].depends) & set(infos) for n in infos}, "dependency")


def allowed(path: Path, prefixes: tuple[str, ...]) -> bool:
    text = str(path)
    return any(text.startswith(p) if p.endswith("/") else (text == p or text.startswith(p + "/")) for p in prefixes)


def choose(name: str, candidates: list[Candidate]) -> tuple[Candidate | None, str | None]:
    """The file modprobe's order gives NAME: the first module directory that has one. Two files
    of one module in that directory are fine when they are the same module (one srcversion);
    otherwise which one loads is an accident of the tree, so refuse, naming both."""
    if not candidates:
        return None, None
    first = [c for c in candidates if c.top == candidates[0].top]
    kinds = {(c.info.version, c.info.srcversion) if c.info else ("unreadable", str(c.resolved)) for c in first}
    if len({c.resolved for c in first}) > 1 and len(kinds) > 1:
        files = " and ".join(f"{c.path} ({q(c.info.version) if c.info else c.error})" for c in first)
        return None, f"{candidates[0].top} has more than one file for {name}: {files}; remove all but one"
    return first[0], None


def check_new_module(name: str, candidates: list[Candidate], config: Config, running: str,
                     is_driver: bool, missing_dirs: tuple[str, ...] = ()) -> tuple[ModInfo | None, str | None]:
    """The file to load for NAME, or why there is none that may be loaded. IS_DRIVER: it must carry
    the driver's version (a holder such as nvidia_fs has its own)."""
    candidate, problem = choose(name, candidates)
    if problem:
        return None, problem
    if candidate is None:
        where = ", ".join(f"{d} (missing)" if d in missing_dirs else d for d in config.module_dirs)
        return None, f"{name} is needed but no {name.replace('_', '-')}.ko(.xz/.zst) was found in {where}"
    if not allowed(candidate.resolved, config.allowed_prefixes):
        return None, (f"{candidate.path} resolves to {candidate.resolved}, outside the allowed prefixes "
                      f"{', '.join(config.allowed_prefixes)}")
    if candidate.info is None:
        return None, f"cannot use {candidate.path}: {candidate.error}"
    info = candidate.info
    if info.kernel_release != running:
        return None, f"{candidate.path} was built for kernel {q(info.kernel_release)}, not the running {running} (vermagic)"
    if is_driver and info.version != config.driver_version:
        return None, (f"{candidate.path} has version {q(info.version)}, but the profile's driver is "
                      f"{config.driver_version}")
    if name == "nvidia_peermem" and CORE not in info.depends:
        # NVIDIA's nvidia-peermem.c compiles its peer-memory client, and with it every call into
        # nvidia, only with MLNX_OFED's ib_register_peer_memory_client; without it the module's
        # init returns -EINVAL ("module compiled without IB peer memory symbols present").
        return None, (f"{candidate.path} was built without InfiniBand peer-memory support (it does not use "
                      f"nvidia): its init fails with EINVAL. Leave nvidia_peermem out of the modules to load "
                      f"(boot.kernelModules), or build the driver against an InfiniBand stack with peer memory")
    return info, None


def tree_once(problems: list[str]) -> list[str]:
    """PROBLEMS that begin with a module file's path, grouped by directory and by what is wrong:
    a store path of 120 characters named once, not once per module ("in DIR: nvidia.ko.xz,
    nvidia-uvm.ko.xz were built for kernel ..."). Others as they are, each once."""
    groups: dict[tuple[str, str], list[str]] = {}
    for problem in dict.fromkeys(problems):
        path, sep, rest = problem.partition(" ")
        key = (os.path.dirname(path), sep + rest) if path.startswith("/") and sep else ("", problem)
        groups.setdefault(key, []).append(os.path.basename(path) if key[0] else "")
    out = []
    for (directory, rest), names in groups.items():
        if not directory:
            out.append(rest)
            continue
        if len(names) > 1:
            rest = rest.replace(" was ", " were ", 1).replace(" has version", " have version", 1)
        out.append(f"in {directory}: {', '.join(names)}{rest}")
    return out


def find_rollback(name: str, snapshot: Snapshot, candidates: list[Candidate], config: Config) -> ModInfo | None:
    """A file of the module that is loaded now: same version and, where both have one, the same
    srcversion. A file matching only one of them (a stale record, a rebuilt module) is not it."""
    loaded = snapshot.modules[name]
    for candidate in candidates:
        info = candidate.info
        if info is None or info.kernel_release != snapshot.kernel_release:
            continue
        if not allowed(candidate.resolved, config.allowed_prefixes):
            continue
        if LoadStep.of(info, "").matches(loaded):
            return info
    return None


def ships(name: str, new: Inventory, config: Config) -> bool:
    """The new driver ships NAME: its file in the module dirs carries the driver's version."""
    candidate, _ = choose(name, new.get(name, []))
    return candidate is not None and candidate.info is not None and candidate.info.version == config.driver_version


def foreign_modules(snapshot: Snapshot, config: Config, new: Inventory) -> list[str]:
    """Stale modules of nvidia's closure that the new driver does not ship: holders (nvidia_fs)."""
    return [n for n in stale_modules(snapshot, config) if n != CORE and not ships(n, new, config)]


def plan_change(snapshot: Snapshot, config: Config, new: Inventory, old: Inventory,
                params: dict[str, str], holders: list[Holder], soft: tuple[str, ...] = (),
                missing_dirs: tuple[str, ...] = (), rollback_params: dict[str, str] | None = None) -> Plan:
    """Plan a load (nothing loaded) or a swap (another version loaded); refuse or defer otherwise."""
    base = _base(snapshot, config)
    running = snapshot.kernel_release
    family = snapshot.family()
    action: Action = SWAP if family else LOAD

    # What must be loaded afterwards: what is unloaded, the configured set, and their dependencies.
    # Soft dependencies (modprobe.d softdep, e.g. nvidia -> nvidia_uvm) are optional, as for
    # modprobe: loaded when the new driver ships them, skipped otherwise.
    configured = {CORE, *config.modules}
    wanted = list(dict.fromkeys(family + list(config.modules) + [d for d in soft if ships(d, new, config)]))
    infos: dict[str, ModInfo] = {}
    problems: list[str] = []
    todo = list(wanted)
    while todo:
        name = todo.pop(0)
        if name in infos:
            continue
        is_driver = name in configured or ships(name, new, config)
        info, problem = check_new_module(name, new.get(name, []), config, running, is_driver, missing_dirs)
        if problem:
            problems.append(problem)
            continue
        assert info is not None
        infos[name] = info
        # A dependency the new driver ships, or one this swap unloads, comes from the module dirs;
        # any other belongs to the running kernel (drm), which loads it by name.
        todo.extend(dep for dep in info.depends if dep not in infos and (ships(dep, new, config) or dep in family))
    if problems:
        return Plan(REFUSE, "the new driver's modules cannot be loaded: " + "; ".join(tree_once(problems))
                    + ". Nothing was unloaded; the loaded driver keeps running", **base)

    # Modules the new ones need that belong to the running kernel (drm, drm_kms_helper, ...).
    prerequisites = sorted({dep for info in infos.values() for dep in info.depends
                            if dep not in infos and dep not in snapshot.modules})

    rollback: list[LoadStep] = []
    if family:
        missing = []
        rollback_infos: dict[str, ModInfo] = {}
        for name in family:
            found = find_rollback(name, snapshot, old.get(name, []), config)
            if found is None:
                loaded = snapshot.modules[name]
                missing.append(f"{name} {q(loaded.version)}" + (f" srcversion {loaded.srcversion}" if loaded.srcversion else ""))
            else:
                rollback_infos[name] = found
        if missing:
            return Plan(REFUSE, (f"no file of the loaded module(s) {', '.join(missing)} was found in the rollback "
                                 f"directories ({', '.join(config.rollback_dirs) or 'none configured'}): a failed swap "
                                 f"could not be undone, so nothing was changed"), **base)
        # The options the loaded modules were loaded with, not the new generation's: an option
        # the old driver does not know would fail the rollback.
        old_params = params if rollback_params is None else rollback_params
        rollback = [LoadStep.of(rollback_infos[n], old_params.get(n, "")) for n in load_order(rollback_infos)]

    load = tuple(LoadStep.of(infos[n], params.get(n, "")) for n in load_order(infos))
    notes = undeclared_options(load, infos)
    unload = tuple(unload_order(snapshot, family))
    loaded = base["loaded_version"]
    how = direction(loaded, config.driver_version)
    change = {"install": f"load NVIDIA driver {config.driver_version}",
              "downgrade": f"downgrade NVIDIA driver {loaded} -> {config.driver_version} (an older generation)"}.get(
                  how, f"{how} NVIDIA driver {loaded} -> {config.driver_version}")
    if action == LOAD:
        change = f"load NVIDIA driver {config.driver_version}"

    if action == SWAP:
        procs = holders
        unexplained = [explain_kernel_references(snapshot.modules[n]) for n in family if snapshot.modules[n].kernel_users]
        if procs or unexplained:
            who = [h.describe() for h in procs] or unexplained
            units = sorted({h.unit for h in procs if h.unit})
            # Stopping units can only help when processes hold the GPU; swap re-checks after stopping them.
            stoppable = (config.on_busy == "stop-units" and procs
                         and all(h.unit in config.stop_units for h in procs))
            if stoppable:
                return Plan(SWAP, f"{change}, stopping {', '.join(units)} which hold the GPU",
                            unload=unload, load=load, rollback=tuple(rollback), prerequisites=tuple(prerequisites),
                            holders=tuple(procs), stop_units=tuple(units), direction=how, notes=notes, **base)
            reason = f"cannot {change}: the GPU is in use: {'; '.join(who)}"
            if config.on_busy == "stop-units":
                outside = sorted({h.unit or f'pid {h.pid}' for h in procs if h.unit not in config.stop_units})
                reason += f" ({', '.join(outside) or 'kernel users'} not in stop_units)"
            if config.on_busy == "fail":
                return Plan(REFUSE, reason, holders=tuple(procs), direction=how, **base)
            return Plan(DEFER, reason + ". The loaded driver stays until they stop", holders=tuple(procs),
                        direction=how, waits_for="idle", **base)

    return Plan(action, change, unload=unload, load=load, rollback=tuple(rollback),
                prerequisites=tuple(prerequisites), direction=how, notes=notes, **base)


def undeclared_options(load: tuple[LoadStep, ...], infos: dict[str, ModInfo]) -> tuple[str, ...]:
    """The options (modprobe.d, the kernel command line) that a module about to be loaded does not
    declare: the kernel loads it anyway, logging only "unknown parameter ... ignored"
    (kernel/params.c), so a typo or an option the new driver dropped would pass unseen."""
    notes = []
    for step in load:
        declared = infos[step.name].params
        if declared is None or not step.params:
            continue
        unknown = [o for o in step.params.split() if o.split("=", 1)[0].replace("-", "_") not in
                   {d.replace("-", "_") for d in declared}]
        if unknown:
            notes.append(f"{step.name} {step.version or ''}".rstrip() + f" declares no parameter {', '.join(unknown)} "
                         f"(from modprobe.d or the kernel command line): the kernel ignores it")
    return tuple(notes)


class Restore(NamedTuple):
    """How to get from the loaded modules to a rollback target: unload only what differs from it
    (users first), keep what already is it, load what is missing. BLOCKED: modules that differ
    and have references no unload can drop (an open /dev/nvidia0): acting would tear down the
    rest and still not reach the target, so nothing is done."""

    unload: tuple[str, ...]
    load: tuple[LoadStep, ...]
    keep: tuple[str, ...]
    blocked: tuple[str, ...]


def plan_restore(snapshot: Snapshot, target: Iterable[LoadStep], scope: Iterable[str] = ()) -> Restore:
    """TARGET: the modules to end with, in load order. SCOPE: other modules that must not stay
    loaded unless they are in the target (what the swap may have loaded)."""
    steps = {s.name: s for s in target}
    considered = (set(snapshot.family()) | set(steps) | set(scope)) & set(snapshot.modules)
    wrong = {n for n in considered if n not in steps or not steps[n].matches(snapshot.modules[n])}
    wrong = snapshot.holders_closure(wrong)
    blocked = tuple(sorted(n for n in wrong if snapshot.modules[n].kernel_users))
    keep = tuple(sorted(n for n in steps if n in snapshot.modules and n not in wrong))
    if blocked:
        return Restore((), (), keep, blocked)
    load = tuple(s for s in steps.values() if s.name not in keep)
    return Restore(tuple(unload_order(snapshot, wrong)), load, keep, ())


def restore_problems(snapshot: Snapshot, target: Iterable[LoadStep]) -> list[str]:
    """What sysfs shows that is not the target."""
    problems = []
    for step in target:
        loaded = snapshot.modules.get(step.name)
        if loaded is None:
            problems.append(f"{step.name} is not loaded")
        elif not step.matches(loaded):
            problems.append(f"{step.name} is loaded with version {q(loaded.version)} srcversion {q(loaded.srcversion)}, "
                            f"not {q(step.version)} {q(step.srcversion)}")
    return problems


# What retry-deferred does with a deferral (deferral_step).
START, DROP, WAIT = "start", "drop", "wait"


def deferral_step(waits_for: str, gpu_busy: bool, plan: Plan | None) -> str:
    """The deferral policy, for a timer tick: START the swap unit, DROP the deferral (nothing left
    to do, or a swap that cannot run: a refusal is reported once, never retried every tick), or
    WAIT for the next tick. PLAN is made only once the GPU is idle (None before)."""
    if waits_for != "idle" or gpu_busy or plan is None:
        return WAIT  # a new kernel waits for a reboot; a busy GPU for the next tick
    if plan.action in (LOAD, SWAP):
        return START
    if plan.action == DEFER and plan.waits_for == "idle":
        return WAIT  # a holder the process list did not show (a kernel reference)
    return DROP  # nothing to do, refused, or waiting for a reboot now


def changed_since(snapshot: Snapshot, plan: Plan) -> bool:
    """Whether sysfs shows a change of the driver PLAN was about to make: a module it would unload
    is gone or another, or a module it loads is there that was not loaded before."""
    before = {s.name for s in plan.rollback}
    return bool(restore_problems(snapshot, plan.rollback)) or any(
        s.name in snapshot.modules for s in plan.load if s.name not in before)


def refuse_repeat(plan: Plan, failure: dict[str, Any] | None, record_path: str) -> Plan:
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
