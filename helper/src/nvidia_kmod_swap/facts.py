"""Gathers what the planner needs from the system, read-only, and hands it to plan.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import holders as holders_mod
from . import params as params_mod
from .config import Config
from .modinfo import ModuleFileError, ModuleFiles, module_name, read_modinfo
from .paths import Root
from .plan import Candidate, Inventory, Plan, plan_change, refuse_repeat, triage
from .snapshot import Snapshot, read_snapshot

LOADED_RECORD = "loaded.json"
FAILED_RECORD = "failed.json"


def candidate(path: Path) -> Candidate:
    resolved = Path(os.path.realpath(path))
    try:
        return Candidate(path, resolved, info=read_modinfo(path))
    except ModuleFileError as e:
        return Candidate(path, resolved, error=str(e).removeprefix(f"{path}: "))
    except Exception as e:  # e.g. zstandard missing: a reason, not a crash
        return Candidate(path, resolved, error=f"{type(e).__name__}: {e}")


def inventory(files: ModuleFiles, names, extra_files: list[Path] = ()) -> Inventory:
    """Candidates for NAMES only. A NixOS module tree holds thousands of (compressed) in-tree
    modules: only the files of the modules asked for are opened and parsed."""
    wanted = set(names)
    found: Inventory = {}
    for path in extra_files:
        if module_name(path) in wanted:
            c = candidate(path)
            if c.info is not None:
                found.setdefault(c.info.name, []).append(c)
    for name in sorted(wanted):
        paths = files.get(name)
        if paths:
            found.setdefault(name, []).extend(candidate(p) for p in paths)
    return found


def new_inventory(files: ModuleFiles, wanted, driver_version: str) -> Inventory:
    """Candidates for WANTED and, transitively, their dependencies, as far as a dependency can be
    part of the new driver (plan.py decides which are). The dependencies of a kernel module
    (drm -> ...) are not followed: the running kernel loads those by name."""
    found: Inventory = {}
    todo = list(wanted)
    roots = set(wanted)
    while todo:
        name = todo.pop(0)
        paths = [] if name in found else files.get(name)
        if not paths:
            continue
        found[name] = [candidate(p) for p in paths]
        info = found[name][0].info
        if info is not None and (name in roots or info.version == driver_version):
            todo.extend(info.depends)
    return found


def recorded_paths(root: Root, config: Config) -> list[Path]:
    """The files loaded by our last successful swap: the rollback source for the next one, since
    the booted system's module tree holds an older driver by then."""
    try:
        record = json.loads(root(config.state_dir).joinpath(LOADED_RECORD).read_text())
        return [Path(m["path"]) for m in record["modules"] if Path(m["path"]).exists()]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def failed_record(root: Root, config: Config) -> dict | None:
    try:
        return json.loads(root(config.state_dir).joinpath(FAILED_RECORD).read_text())
    except (OSError, ValueError):
        return None


def make_plan(root: Root, config: Config, snapshot: Snapshot | None = None, retry: bool = False) -> Plan:
    snapshot = snapshot or read_snapshot(root)
    early = triage(snapshot, config)
    if early is not None:
        return early
    family = snapshot.family()
    trees = ModuleFiles(config.module_dirs)  # each directory indexed once for both inventories
    wanted = list(dict.fromkeys(family + list(config.modules)))
    # modprobe would load these with the wanted ones (softdep); finit_module does not.
    modprobe_d = params_mod.config_texts(root)  # read once: softdeps here, options below
    softdeps = params_mod.softdeps(modprobe_d)
    soft = list(dict.fromkeys(d for n in wanted for d in softdeps.get(n, []) if d not in wanted))
    new = new_inventory(trees, wanted + soft, config.driver_version)
    # Files of what is loaded now: our last swap's record, the booted system's tree, and the new
    # tree too (a module already at the new version, after an interrupted swap, is rolled back to itself).
    old = (inventory(trees.over(list(config.rollback_dirs) + list(config.module_dirs)), family,
                     recorded_paths(root, config)) if family else {})
    names = set(family) | set(config.modules) | set(new)
    params = params_mod.collect(root, names, modprobe_d)
    gpu_holders = holders_mod.find_holders(root) if family else []
    plan = plan_change(snapshot, config, new, old, params, gpu_holders, soft=tuple(soft))
    if retry:
        return plan
    return refuse_repeat(plan, failed_record(root, config), str(root(config.state_dir) / FAILED_RECORD))
