#!/usr/bin/env python3
"""The helper over Debian's real NVIDIA modules (tests/real-driver/build), laid out as NixOS lays
them out (.ko.xz), against kmod's modinfo of the same files.

    tests/bench/real_tree.py [--runs N] [--check]

Times, in one run, each as its own process (`nvidia-kmod-swap --root <fake /proc, /sys> plan` and
`check`: a swap from a loaded driver to the real 550):
- the helper with the generation's module facts (module_facts, as the NixOS module writes them);
- the helper without them (every .ko.xz streamed: a generation whose facts it does not have);
- kmod's `modinfo` of the same files, the reference.
Peak RSS is each process's own (getrusage of the child). Prints one JSON object with medians,
ratios and the targets of issue 24 (plan and check <= 0.1 s and <= 30 MiB, <= 0.05x modinfo).
--check: also compare the helper's facts of every real file with kmod's modinfo, and the plan's
load steps with them; exit 1 on a difference (the real-driver stage of tests/run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "helper/src"))
sys.path.insert(0, str(REPO / "tests/unit"))
sys.path.insert(0, str(REPO / "tests/vm"))

from fakesys import OLD, FakeSystem, make_config, write_config, write_driver  # noqa: E402
from nvidia_kmod_swap.facts import module_facts  # noqa: E402

CLI = [sys.executable, "-c",
       f"import sys; sys.path.insert(0, {str(REPO / 'helper/src')!r}); from nvidia_kmod_swap.cli import main; sys.exit(main())"]
TARGET_S, TARGET_MIB, TARGET_VS_MODINFO = 0.1, 30, 0.05


def child_peak(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Seconds and peak RSS (MiB) of ARGV alone: measured through a wrapper process of its own."""
    wrapper = [sys.executable, "-c",
               "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "p.returncode, p.stdout, p.stderr]))", *argv]
    out = subprocess.run(wrapper, capture_output=True, text=True, check=True).stdout
    took, rss_kib, code, stdout, stderr = json.loads(out)
    return took, rss_kib / 1024, subprocess.CompletedProcess(argv, code, stdout, stderr)


def modinfo_fields(path: Path) -> dict[str, str | None]:
    out = {}
    for key in ("name", "version", "vermagic", "srcversion", "depends"):
        value = subprocess.run(["modinfo", "-F", key, str(path)], capture_output=True, text=True, check=True).stdout.strip()
        out[key] = value or None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    subprocess.run([str(REPO / "tests/real-driver/build")], check=True)
    import testbed  # noqa: PLC0415

    index = json.loads((testbed.CACHE / "real-driver" / testbed.kernel_abi() / "packages.json").read_text())
    base = testbed.CACHE / "real-driver" / testbed.kernel_abi()
    real = index["packages"]["real-550"]
    tree = base / real["module_dir"].lstrip("/")
    files = sorted(tree.rglob("*.ko.xz"))
    problems: list[str] = []
    result: dict[str, object] = {"driver": real["debian_package"], "kernel": index["kernel_release"],
                                 "files": {f.name: {"ko_bytes": real["sizes"][f.name.removesuffix(".ko.xz")],
                                                    "xz_bytes": f.stat().st_size} for f in files}}
    with tempfile.TemporaryDirectory(prefix="real-tree-") as tmp:
        work = Path(tmp)
        store = work / "nix/store"
        store.mkdir(parents=True)
        system = FakeSystem(work / "root", release=index["kernel_release"])
        old = write_driver(store, OLD, release=index["kernel_release"])
        system.load_driver(OLD)
        facts_file = work / "module-facts.json"
        facts = module_facts([str(tree), str(old)])
        facts_file.write_text(json.dumps(facts))
        configs = {
            "facts": write_config(work / "with.json", make_config(
                store, [tree], [old], driver_version=real["version"], kernel_release=index["kernel_release"],
                allowed_prefixes=[str(base) + "/", str(store) + "/"],
                module_facts=[str(facts_file)])),
            "streamed": write_config(work / "without.json", make_config(
                store, [tree], [old], driver_version=real["version"], kernel_release=index["kernel_release"],
                allowed_prefixes=[str(base) + "/", str(store) + "/"],
                state_dir="/run/no-cache")),
        }
        timings: dict[str, dict[str, list[float]]] = {}
        for label, config in configs.items():
            for command in ("plan", "check"):
                key = f"{command}_{label}"
                for _ in range(args.runs if label == "facts" else max(1, args.runs // 3)):
                    if label == "streamed":  # no cache of an earlier run: every file streamed again
                        subprocess.run(["rm", "-rf", str(system.root("/run/no-cache"))], check=True)
                    took, rss, proc = child_peak([*CLI, "--root", str(system.base), "--config", str(config),
                                                   "--log-target", "stderr", command])
                    if proc.returncode not in (0, 1):
                        problems.append(f"{key}: exit {proc.returncode}: {proc.stderr[-800:]}")
                    timings.setdefault(key, {"s": [], "mib": []})
                    timings[key]["s"].append(took)
                    timings[key]["mib"].append(rss)
        took, rss, _ = child_peak(["modinfo", *map(str, files)])
        timings["modinfo"] = {"s": [took], "mib": [rss]}
        for _ in range(max(0, args.runs // 3 - 1)):
            took, rss, _ = child_peak(["modinfo", *map(str, files)])
            timings["modinfo"]["s"].append(took)
            timings["modinfo"]["mib"].append(rss)
        medians = {k: {"s": round(statistics.median(v["s"]), 4), "peak_mib": round(max(v["mib"]), 1)} for k, v in timings.items()}
        result["medians"] = medians
        ref = medians["modinfo"]["s"]
        result["ratios_vs_modinfo"] = {k: round(v["s"] / ref, 4) for k, v in medians.items() if k != "modinfo"}
        result["targets"] = {
            k: {"s": f"{medians[k]['s']} <= {TARGET_S}", "mib": f"{medians[k]['peak_mib']} <= {TARGET_MIB}",
                "vs_modinfo": f"{result['ratios_vs_modinfo'][k]} <= {TARGET_VS_MODINFO}",
                "met": medians[k]["s"] <= TARGET_S and medians[k]["peak_mib"] <= TARGET_MIB}
            for k in ("plan_facts", "check_facts")}
        if args.check:
            every = [f for pkg in index["packages"].values() for f in sorted((base / pkg["module_dir"].lstrip("/")).rglob("*.ko.xz"))]
            facts = {**facts, **module_facts([str(base / pkg["module_dir"].lstrip("/")) for pkg in index["packages"].values()])}
            result["checked_files"] = len(every)
            for path in every:
                theirs = modinfo_fields(path)
                entry = facts.get(os.path.realpath(path))
                ours = None if entry is None else {
                    "name": entry["name"], "version": entry["version"], "vermagic": entry["vermagic"].strip(),
                    "srcversion": entry["srcversion"], "depends": ",".join(entry["depends"]) or None}
                if theirs["depends"]:
                    theirs["depends"] = theirs["depends"].replace("-", "_")
                if ours != theirs:
                    problems.append(f"{path.name}: facts {ours} != modinfo {theirs}")
            _, _, proc = child_peak([*CLI, "--root", str(system.base), "--config", str(configs["streamed"]),
                                     "--log-target", "stderr", "plan", "--json"])
            plan = json.loads(proc.stdout)
            steps = {s["name"]: s for s in plan["load"]}
            if plan["action"] != "swap" or set(steps) != {"nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"}:
                problems.append(f"plan over the real tree: {plan['action']}, loads {sorted(steps)}: {plan['reason']}")
            for name, step in steps.items():
                entry = facts[os.path.realpath(step["path"])]
                if (step["version"], step["srcversion"], tuple(step["depends"] or ())) != (
                        entry["version"], entry["srcversion"], tuple(entry["depends"])):
                    problems.append(f"plan's {name}: {step} against modinfo {entry}")
            result["plan"] = {"action": plan["action"], "load": [(s["name"], Path(s["path"]).name, s["version"])
                                                                 for s in plan["load"]]}
    result["problems"] = problems
    print(json.dumps(result, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
