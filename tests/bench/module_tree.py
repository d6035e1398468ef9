#!/usr/bin/env python3
"""Planning a swap over a whole NixOS-like module tree: by-name lookup against parsing every file.

    tests/bench/module_tree.py [--runs N]

NixOS hands the helper the generation's module tree (system.modulesTree: the kernel's ~4,000
in-tree modules beside the driver's). This builds such a tree from the host's real kernel modules
(/lib/modules/<abi>, symlinked as aggregateModules' buildEnv does, and indexed by depmod as it
does) plus a fake driver in kernel/drivers/video, the booted tree the same shape, and times in one
run:

- plan: facts.make_plan for a swap, as `nvidia-kmod-swap plan` runs it (by-name lookup);
- plan over the driver's own tree alone (what module_dirs was before: the floor);
- parse-all: what the helper did before, reading the .modinfo of every module file in both trees.

Prints one JSON object with medians and their ratio. No root, no VM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "helper/src"))
sys.path.insert(0, str(REPO / "tests/unit"))

from fakesys import NEW, OLD, FakeSystem, write_ko  # noqa: E402
from nvidia_kmod_swap import facts  # noqa: E402
from nvidia_kmod_swap.config import parse  # noqa: E402
from nvidia_kmod_swap.modinfo import _walk as walk_tree  # noqa: E402  (every file, as before)

DRIVER = ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")


def link_merged(target: Path, sources: list[Path]) -> None:
    """buildEnv's merge: an entry only one source has is a symlink; directories several have merge."""
    target.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[Path]] = {}
    for source in sources:
        for entry in sorted(source.iterdir()):
            names.setdefault(entry.name, []).append(entry)
    for name, entries in names.items():
        if name.startswith("modules.") and not name.startswith(("modules.builtin", "modules.order")):
            continue  # depmod's maps, made anew for the merged tree (aggregator.nix does the same)
        if len(entries) > 1 and all(e.is_dir() for e in entries):
            link_merged(target / name, entries)
        else:
            (target / name).symlink_to(entries[0])


def kernel_subset(kernel: Path, target: Path, count: int) -> Path:
    """The first COUNT module files of KERNEL (sorted), symlinked in the same layout: a smaller
    kernel's tree, for plan time against tree size."""
    files = sorted(p for p in kernel.rglob("*") if p.name.endswith((".ko", ".ko.xz", ".ko.zst")))[:count]
    for path in files:
        link = target / path.relative_to(kernel)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return target


def module_tree(store: Path, name: str, kernel: Path, version: str, release: str) -> Path:
    driver = store / f"{name}-driver/lib/modules/{release}"
    if not driver.exists():
        for module in DRIVER:
            write_ko(driver / "kernel/drivers/video", module, version, release=release)
    base = store / f"{name}-kernel-modules"
    tree = base / f"lib/modules/{release}"
    link_merged(tree, [kernel, driver])
    subprocess.run(["depmod", "-b", str(base), release], check=True, stderr=subprocess.DEVNULL)
    return tree


def timed(fn, runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    abi = subprocess.run([str(REPO / "tests/lib/kernel-abi")], capture_output=True, text=True,
                         check=True).stdout.strip()
    kernel = Path("/lib/modules") / abi
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "nix/store"
        new_tree = module_tree(store, "new", kernel, NEW, abi)
        old_tree = module_tree(store, "old", kernel, OLD, abi)
        system = FakeSystem(Path(tmp) / "root", release=abi)
        system.load_driver(OLD)
        config = parse({"driver_version": NEW, "kernel_release": abi, "module_dirs": [str(new_tree)],
                        "rollback_dirs": [str(old_tree)], "modules": list(DRIVER),
                        "allowed_prefixes": [str(store) + "/"]})
        plan = facts.make_plan(system.root, config)
        assert plan.action == "swap", plan.reason
        files = sum(len(v) for v in walk_tree(str(new_tree)).values())

        def parse_all() -> None:
            for tree in (new_tree, old_tree):
                for paths in walk_tree(str(tree)).values():
                    for path in paths:
                        facts.candidate(path)

        driver_only = parse({"driver_version": NEW, "kernel_release": abi,
                             "module_dirs": [str(store / f"new-driver/lib/modules/{abi}")],
                             "rollback_dirs": [str(store / f"old-driver/lib/modules/{abi}")],
                             "modules": list(DRIVER), "allowed_prefixes": [str(store) + "/"]})
        assert facts.make_plan(system.root, driver_only).action == "swap"
        plan_s = timed(lambda: facts.make_plan(system.root, config), args.runs)
        driver_only_s = timed(lambda: facts.make_plan(system.root, driver_only), args.runs)
        parse_all_s = timed(parse_all, max(1, args.runs // 2))
        # Plan time against tree size: the same plan over trees of 1/8 .. all of the kernel's modules.
        by_size = {}
        for eighths in (1, 2, 4):
            count = files * eighths // 8
            subset = kernel_subset(kernel, Path(tmp) / f"kernel-{count}", count)
            sized = {label: module_tree(store, f"{label}-{count}", subset, version, abi)
                     for label, version in (("new", NEW), ("old", OLD))}
            cfg = parse({"driver_version": NEW, "kernel_release": abi, "module_dirs": [str(sized["new"])],
                         "rollback_dirs": [str(sized["old"])], "modules": list(DRIVER),
                         "allowed_prefixes": [str(store) + "/"]})
            assert facts.make_plan(system.root, cfg).action == "swap"
            by_size[count] = round(timed(lambda cfg=cfg: facts.make_plan(system.root, cfg), args.runs) * 1000, 1)
        by_size[files] = round(plan_s * 1000, 1)
    print(json.dumps({
        "kernel": abi,
        "module_files_per_tree": files,
        "plan_ms": round(plan_s * 1000, 1),
        "plan_driver_tree_only_ms": round(driver_only_s * 1000, 1),
        "plan_over_driver_only": round(plan_s / driver_only_s, 2),
        "parse_all_ms": round(parse_all_s * 1000, 1),
        "parse_all_over_plan": round(parse_all_s / plan_s, 1),
        "plan_ms_by_tree_size": {str(k): v for k, v in sorted(by_size.items())},
        "plan_largest_over_smallest_tree": round(by_size[files] / by_size[min(by_size)], 2),
        "target": "plan over a whole module tree within 4x of plan over the driver's tree alone; "
                  "flat in tree size (largest/smallest tree within 2x for 8x the modules)",
    }, indent=2))


if __name__ == "__main__":
    main()
