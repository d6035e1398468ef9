"""Gathers what the planner needs from the system, read-only, and hands it to plan.py."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from . import holders as holders_mod
from . import params as params_mod
from .config import Config
from .modinfo import (
    SUFFIXES,
    ModInfo,
    ModuleFileError,
    ModuleFiles,
    add_facts,
    facts_entry,
    module_name,
    read_facts,
    read_modinfo,
    remember_below,
)
from .paths import Root
from .plan import Candidate, Inventory, LoadStep, Plan, foreign_modules, plan_change, refuse_repeat, stale_modules, triage
from .rules import BOOTED_CONFIG, CORE
from .snapshot import Snapshot, read_snapshot
from .state import FAILED_RECORD, LoadedRecord, StateDir, StateError


def candidate(path: Path, top: str = "") -> Candidate:
    resolved = Path(os.path.realpath(path))
    try:
        return Candidate(path, resolved, info=read_modinfo(path), top=top)
    except ModuleFileError as e:
        return Candidate(path, resolved, error=str(e).removeprefix(f"{path}: "), top=top)
    except Exception as e:  # e.g. zstandard missing: a reason, not a crash
        return Candidate(path, resolved, error=f"{type(e).__name__}: {e}", top=top)


def _candidates(files: ModuleFiles, name: str) -> list[Candidate]:
    return [candidate(p, top) for top, p in files.get_with_dirs(name)]


def inventory(files: ModuleFiles, names: Iterable[str], extra_files: Iterable[Path] = ()) -> Inventory:
    """Candidates for NAMES only. A NixOS module tree holds thousands of (compressed) in-tree
    modules: only the files of the modules asked for are opened and parsed."""
    wanted = set(names)
    found: Inventory = {}
    for path in extra_files:
        if module_name(path) in wanted:
            c = candidate(path, "loaded.json")
            if c.info is not None:
                found.setdefault(c.info.name, []).append(c)
    for name in sorted(wanted):
        found.setdefault(name, []).extend(_candidates(files, name))
    return {n: c for n, c in found.items() if c}


def new_inventory(files: ModuleFiles, wanted: Iterable[str], driver_version: str) -> Inventory:
    """Candidates for WANTED and, transitively, their dependencies, as far as a dependency can be
    part of the new driver (plan.py decides which are). The dependencies of a kernel module
    (drm -> ...) are not followed: the running kernel loads those by name."""
    found: Inventory = {}
    todo = list(wanted)
    roots = set(wanted)
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        candidates = _candidates(files, name)
        if not candidates:
            continue
        found[name] = candidates
        info = candidates[0].info
        if info is not None and (name in roots or info.version == driver_version):
            todo.extend(info.depends)
    return found


def driver_modules(loaded: Iterable[LoadStep], version: str) -> list[ModInfo]:
    """The modules a loaded driver ships: the files loaded (resolved) and, beside them, the files
    of its version that are not loaded now (nvidia_peermem, nvidia_vgpu_vfio, an unloaded
    nvidia_uvm). A file that cannot be read is left out."""
    found: dict[str, ModInfo] = {}
    dirs: dict[Path, None] = {}
    for step in loaded:
        path = Path(os.path.realpath(step.path))
        if step.depends is not None:  # read when the swap planned it: not again
            found[step.name] = ModInfo(path, step.name, step.version, "", step.depends, step.srcversion)
        else:
            try:
                found[step.name] = read_modinfo(path)
            except (OSError, ModuleFileError):
                continue
        dirs[path.parent] = None
    for directory in dirs:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            path = directory / entry
            name = module_name(path)
            # NVIDIA's modules are all nvidia* (kernel-open/Makefile NV_KERNEL_MODULES); a package
            # that also holds gdrdrv or another holder is not read for it.
            if not entry.endswith(SUFFIXES) or not name.startswith("nvidia") or name in found:
                continue
            try:
                info = read_modinfo(path)
            except (OSError, ModuleFileError):
                continue
            if info.version == version:
                found[info.name] = info
    return list(found.values())


def _rollback_params(root: Root, family: list[str], params: dict[str, str], record: LoadedRecord | None,
                     loaded_version: str | None) -> dict[str, str]:
    """The options the loaded driver's modules were loaded with: what this helper recorded when it
    loaded them, else the booted generation's modprobe.d (and the kernel command line), else, where
    neither is known, today's."""
    if not family:
        return {}
    booted_texts = params_mod.config_texts(root, booted=True)
    found = dict(params_mod.collect(root, family, booted_texts) if booted_texts else params)
    if record is not None and record.driver_version == loaded_version:
        found.update({m.name: m.params for m in record.modules if m.name in family})
    return found


def make_plan(root: Root, config: Config, snapshot: Snapshot | None = None, retry: bool = False) -> Plan:
    snapshot = snapshot or read_snapshot(root)
    trees = ModuleFiles(config.module_dirs)  # each directory indexed once for all lookups
    # A module of nvidia's closure with a version of its own is either a stale driver module or a
    # holder (nvidia_fs): the new tree tells which. Only those files are read on the no-op path.
    # (Only when nvidia itself is current: otherwise the driver is swapped either way.)
    stale = ([n for n in stale_modules(snapshot, config) if n != CORE]
             if snapshot.version(CORE) == config.driver_version else [])
    foreign = foreign_modules(snapshot, config, {n: _candidates(trees, n) for n in stale}) if stale else []
    early = triage(snapshot, config, foreign)
    if early is not None:
        return early
    state = StateDir(root(config.state_dir))
    family = snapshot.family()
    wanted = list(dict.fromkeys(family + list(config.modules)))
    # modprobe would load these with the wanted ones (softdep); finit_module does not.
    modprobe_d = params_mod.config_texts(root)  # read once: softdeps here, options below
    softdeps = params_mod.softdeps(modprobe_d)
    soft = list(dict.fromkeys(d for n in wanted for d in softdeps.get(n, []) if d not in wanted))
    new = new_inventory(trees, wanted + soft, config.driver_version)
    # Files of what is loaded now: our last swap's record, the booted system's tree, and the new
    # tree too (a module already at the new version, after an interrupted swap, is rolled back to itself).
    loaded_record = state.loaded()
    recorded = [Path(m.path) for m in loaded_record.modules if Path(m.path).exists()] if loaded_record else []
    old = (inventory(trees.over(list(config.rollback_dirs) + list(config.module_dirs)), family, recorded)
           if family else {})
    names = set(family) | set(config.modules) | set(new)
    params = params_mod.collect(root, names, modprobe_d)
    rollback_params = _rollback_params(root, family, params, loaded_record, snapshot.version(CORE))
    gpu_holders = holders_mod.find_holders(root) if family else []
    missing = tuple(d for d in config.module_dirs if not os.path.isdir(d))
    plan = plan_change(snapshot, config, new, old, params, gpu_holders, soft=tuple(soft), missing_dirs=missing,
                       rollback_params=rollback_params)
    if retry:
        return plan
    failed = state.failed()
    return refuse_repeat(plan, failed.as_failure() if failed else None, str(root(config.state_dir) / FAILED_RECORD))


FACTS_CACHE = "module-facts.json"  # in the state dir: what this boot's runs read of store files


def learn_facts(root: Root, config: Config) -> None:
    """What is known of module files before any is read: this generation's build-time facts, the
    booted generation's, and what earlier runs of this boot read (one bump runs `check` for the
    swap unit and every GPU unit, then `swap`: each store file is read once at most)."""
    import json

    remember_below(config.allowed_prefixes)
    sources = [Path(p) for p in config.module_facts]
    try:
        booted = json.loads(root(BOOTED_CONFIG).read_bytes())
        if isinstance(booted, dict) and isinstance(booted.get("module_facts"), list):
            sources += [Path(p) for p in booted["module_facts"] if isinstance(p, str) and p.startswith("/")]
    except (OSError, ValueError):
        pass
    for source in sources:
        try:
            add_facts(json.loads(source.read_bytes()))
        except (OSError, ValueError):
            continue  # a file it cannot read: the modules are read instead
    try:
        cached = StateDir(root(config.state_dir)).read(FACTS_CACHE)
    except StateError:
        cached = None
    add_facts(cached)


def keep_facts(root: Root, config: Config) -> None:
    """This run's reads of store files, added to the state directory's cache (best effort)."""
    new = read_facts()
    if not new:
        return
    state = StateDir(root(config.state_dir))
    try:
        cached = state.read(FACTS_CACHE)
        merged = {**(cached if isinstance(cached, dict) else {}), **new}
        state.ensure()
        state.write(FACTS_CACHE, merged)
    except (OSError, StateError):
        pass


def module_facts(dirs: Iterable[str], every: Iterable[str] = ()) -> dict[str, dict[str, object]]:
    """`nvidia-kmod-swap facts`: the facts of the driver's module files in DIRS (nvidia* and,
    transitively, their dependencies found there) and of every module in EVERY, keyed by resolved
    path. Run at build time over a generation's module trees; a file that cannot be read is left
    out (the helper then reads it, and says what is wrong with it)."""
    files = ModuleFiles(list(dirs))
    names = [n for n in files.names() if n.startswith("nvidia")]
    extra = ModuleFiles(list(every))
    out: dict[str, dict[str, object]] = {}
    seen: set[str] = set()
    todo = list(names) + extra.names()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for _top, path in files.get_with_dirs(name) + extra.get_with_dirs(name):
            try:
                info = read_modinfo(path)
                resolved = os.path.realpath(path)
                out[resolved] = facts_entry(info, os.stat(resolved).st_size)
            except (OSError, ModuleFileError):
                continue
            todo.extend(info.depends)
    return dict(sorted(out.items()))
