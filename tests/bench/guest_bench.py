#!/usr/bin/python3
"""Runs inside the test bed guest (python3 of Debian): times the helper against its floors.

Prints one JSON object. Every comparison is measured in this one run, interleaved, so the ratios
hold whatever the speed of the (emulated) machine.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "/etc/nvidia-kmod-swap/config.json"
# The helper as the unit runs it: its entries go to the journal (the default target, "auto"), so
# that systemd-python's import is in the swap's time as it is in the unit's.
HELPER = ["/usr/bin/nvidia-kmod-swap", "--config", CONFIG]
PACKAGES = json.loads(Path("/etc/testbed/packages.json").read_text())["packages"]
SEED = Path("/usr/local/lib/testbed/seed-script.sh")
# The helpers of earlier revisions (tests/bench/run --before, --before-swap).
BEFORE = Path("/usr/local/bin/nvidia-kmod-swap-before")
BEFORE_SWAP = Path("/usr/local/bin/nvidia-kmod-swap-before-swap")


@functools.cache
def known_keys(tag: str) -> frozenset[str]:
    """The config keys the helper installed under TAG knows (asked once per run)."""
    out = subprocess.run(
        ["/usr/bin/python3", "-c", f"import json, sys; sys.path.insert(0, '/usr/lib/nvidia-kmod-swap-{tag}')\n"
         "try:\n from nvidia_kmod_swap.rules import KEYS\nexcept ImportError:\n from nvidia_kmod_swap.quick import KEYS\n"
         "print(json.dumps(sorted(KEYS)))"], capture_output=True, text=True, check=True).stdout
    return frozenset(json.loads(out))


def before_argv(launcher: Path, log_target: str = "auto") -> list[str]:
    """The earlier helper with today's config (rewritten by each switch) minus the keys it does not
    know (it refuses them)."""
    tag = launcher.name.removeprefix("nvidia-kmod-swap-")
    config = json.loads(Path(CONFIG).read_text())
    path = f"/etc/nvidia-kmod-swap/config-{tag}.json"
    Path(path).write_text(json.dumps({k: v for k, v in config.items() if k in known_keys(tag)}))
    return [str(launcher), *(["--log-target", log_target] if log_target != "auto" else []), "--config", path]
DRIVER = ["nvidia", "nvidia-modeset", "nvidia-uvm", "nvidia-drm"]
NOOP_RUNS = int(os.environ.get("BENCH_NOOP_RUNS", "30"))
SWAP_RUNS = int(os.environ.get("BENCH_SWAP_RUNS", "6"))
# Only the before/after comparisons (the no-op path and 1-GPU swaps), not the scaling runs.
BEFORE_AFTER_ONLY = os.environ.get("BENCH_BEFORE_AFTER_ONLY") == "1"


def run(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, max RSS KiB) of one child process, which must succeed."""
    elapsed, rss, code = run_status(argv)
    if code != 0:
        sys.exit(f"bench: {' '.join(argv)} exited {code}")
    return elapsed, rss


def run_status(argv: list[str]) -> tuple[float, int, int]:
    """(wall seconds, max RSS KiB, exit code) of one child process; its stderr's tail when it fails."""
    elapsed, code, rss, _, _ = run_accounted(argv, udev=False)
    return elapsed, rss, code


TICK = os.sysconf("SC_CLK_TCK")


def udev_cpu() -> float:
    """CPU seconds used so far by udevd and its workers, with the programs their rules ran
    (reaped children's times, /proc/PID/stat fields 14-17)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1: stat.rindex(")")] in ("systemd-udevd", "(udev-worker)"):
            total += sum(int(v) for v in stat[stat.rindex(")") + 2:].split()[11:15])
    return total / TICK


def run_accounted(argv: list[str], udev: bool = True) -> tuple[float, int, int, float, float]:
    """(wall seconds, exit code, max RSS KiB, CPU seconds of the process and what it ran, of udev
    meanwhile (UDEV; else 0)) of one child process; its stderr's and the journal's tails when it
    fails. On the guest's one vCPU the wall time is about the sum of the CPU times."""
    udev_before = udev_cpu() if udev else 0.0
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    udev_used = udev_cpu() - udev_before if udev else 0.0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        journal = subprocess.run(["journalctl", "-n", "15", "-o", "cat", "--no-pager"], capture_output=True, text=True).stdout
        print(f"bench: {' '.join(argv)} exited {code}: {err[-800:]}\njournal:\n{journal}", file=sys.stderr)
    return elapsed, code, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, udev_used


def switch(label: str, extra: list[str] = ()) -> None:
    subprocess.run(["switch-driver", label, "--no-reload", *extra], check=True)


def module_paths(label: str, names: list[str]) -> list[str]:
    root = Path(PACKAGES[label]["module_dir"])
    return [str(next(root.rglob(f"{name}.ko*"))) for name in names]


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def ms(samples: list[float]) -> list[int]:
    return [round(t * 1000) for t in samples]


def paired_ratio(after: list[float], before: list[float], resamples: int = 4000) -> dict:
    """median(AFTER) / median(BEFORE) for samples taken in interleaved pairs, with a 95% bootstrap
    interval over the pairs (resampled together, so a slow stretch of the machine weighs on both
    sides alike). "No slower" is shown when the interval's upper end is at most 1."""
    import random

    rng = random.Random(0)  # the same interval for the same samples
    pairs = list(zip(after, before, strict=True))
    ratios = sorted(
        statistics.median(a for a, _ in sample) / statistics.median(b for _, b in sample)
        for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(resamples)))
    return {"ratio": round(statistics.median(after) / statistics.median(before), 3),
            "ci95": [round(ratios[int(0.025 * resamples)], 3), round(ratios[int(0.975 * resamples) - 1], 3)],
            "pairs": len(pairs)}


def noop(label: str, before_too: bool = False) -> dict:
    """Versions equal: the helper's check + swap, the floor, the seed script; interleaved."""
    switch(label)
    version = PACKAGES[label]["version"]
    floor_cmd = ["/bin/sh", "-c", f'read v < /sys/module/nvidia/version && [ "$v" = "{version}" ]']
    helper, floor, seed, rss, before = [], [], [], [], []
    before_too = before_too and BEFORE.exists()
    argv = before_argv(BEFORE, "auto") if before_too else []
    for _ in range(NOOP_RUNS):
        t1, r1 = run(HELPER + ["check"])
        t2, r2 = run(HELPER + ["swap"])
        helper.append(t1 + t2)
        rss.append(max(r1, r2))
        if before_too:
            before.append(run(argv + ["check"])[0] + run(argv + ["swap"])[0])
        floor.append(run(floor_cmd)[0])
        if SEED.exists():
            seed.append(run(["/bin/bash", str(SEED)])[0])
    result = {"helper_ms": median_ms(helper), "floor_ms": median_ms(floor), "max_rss_kib": max(rss)}
    if seed:
        result["seed_script_ms"] = median_ms(seed)
    if before:
        result["before_helper_ms"] = median_ms(before)
        result["vs_before"] = paired_ratio(helper, before)
    return result


def bare_swap(to: str, names: list[str], params: str) -> None:
    """The kernel work alone: rmmod users first, insmod the new files, wait for udev to settle."""
    for name in reversed(names):
        subprocess.run(["rmmod", name.replace("-", "_")], check=True)
    for path in module_paths(to, names):
        argv = ["insmod", path] + (params.split() if path.split("/")[-1].startswith("nvidia.ko") and params else [])
        subprocess.run(argv, check=True)
    subprocess.run(["udevadm", "settle"], check=True)
    for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"):
        if not os.path.exists(node):
            sys.exit(f"bench: {node} missing after a bare swap")


def configure(names: list[str], params: str) -> list[str]:
    """The nvidia options the swaps load with (a modprobe.d file, which the helper reads), and the
    switch-driver arguments that make NAMES the configured modules."""
    Path("/etc/modprobe.d/bench.conf").write_text(f"options nvidia {params}\n" if params else "")
    modules = [n.replace("-", "_") for n in names]
    return ["--set", f"modules={json.dumps(modules)}"]


def assert_gpus(gpus: int) -> None:
    """The loaded driver drives GPUS fake GPUs: the swaps ran with the options configure() wrote."""
    count = len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    assert count == gpus, f"{count} GPUs, expected {gpus}"


def swaps(names: list[str], gpus: int, before_too: bool = False) -> dict:
    """Full swaps old<->new by the helper vs. the same rmmod/insmod by hand (and, BEFORE_TOO, by
    the helper of --before-swap); interleaved."""
    params = f"gpus={gpus}" if gpus != 1 else ""
    extra = configure(names, params)
    helper, bare, rss, before, before_failed = [], [], [], [], 0
    cpu: dict[str, list[float]] = {"helper": [], "helper_udev": [], "before": [], "before_udev": []}
    before_too = before_too and BEFORE_SWAP.exists()
    for _ in range(SWAP_RUNS):
        for target in ("new", "old"):
            switch(target, extra)
            t, code, r, own, udev = run_accounted(HELPER + ["swap"], udev=before_too)
            if code != 0:
                sys.exit("bench: the helper's swap failed")
            helper.append(t)
            rss.append(r)
            if before_too:  # where the time goes, beside the before helper's
                cpu["helper"].append(own)
                cpu["helper_udev"].append(udev)
        if before_too:
            for target in ("new", "old"):
                switch(target, extra)
                t, code, _, own, udev = run_accounted(before_argv(BEFORE_SWAP) + ["swap"])
                if code == 0:
                    before.append(t)
                    cpu["before"].append(own)
                    cpu["before_udev"].append(udev)
                else:  # counted, not timed; today's helper recovers whatever it left
                    before_failed += 1
                    switch(target, extra)
                    run(HELPER + ["swap"])
        for target in ("new", "old"):
            start = time.perf_counter()
            bare_swap(target, names, params)
            bare.append(time.perf_counter() - start)
    assert_gpus(gpus)
    result = {"helper_ms": median_ms(helper), "bare_ms": median_ms(bare), "max_rss_kib": max(rss),
              "samples_ms": {"helper": ms(helper), "bare": ms(bare), **({"before": ms(before)} if before else {})}}
    if before_too:
        result["before_failed"] = before_failed
        # CPU medians (ms): the helper process with what it ran (nvidia-smi), and udev's workers
        # with their rules' programs, for today's helper and the before one.
        result["cpu_ms"] = {k: median_ms(v) for k, v in cpu.items() if v}
    if before:
        result["before_helper_ms"] = median_ms(before)
        if not before_failed:
            result["vs_before"] = paired_ratio(helper, before)
    return result


# Another device's udev event that keeps a worker busy for BUSY_RULE_S, as a slow disk or network
# rule may: a RUN+= program on a "change" event of /dev/zero, installed for busy_udev_swaps only.
BUSY_DEVICE = "/sys/devices/virtual/mem/zero"
BUSY_RULE_S = 4
BUSY_RULE = Path("/etc/udev/rules.d/99-bench-busy-device.rules")


def busy_udev_swaps(names: list[str]) -> dict:
    """1-GPU swaps old<->new by today's helper and the before one, interleaved, each started while
    udev runs another device's slow rule: what waiting for the modules' own processed events
    (today) instead of for udev's whole queue (before: /run/udev/queue) is worth."""
    extra = configure(names, "")  # 1 GPU, whatever the scaling runs left
    BUSY_RULE.write_text(f'ACTION=="change", SUBSYSTEM=="mem", KERNEL=="zero", RUN+="/bin/sleep {BUSY_RULE_S}"\n')
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    walls: dict[str, list[float]] = {"helper": [], "before": []}
    busy_at_end: dict[str, int] = {"helper": 0, "before": 0}
    for _ in range(SWAP_RUNS):
        for who in ("helper", "before"):
            for target in ("new", "old"):
                switch(target, extra)
                subprocess.run(["udevadm", "settle"], check=True)
                subprocess.run(["udevadm", "trigger", "--action=change", BUSY_DEVICE], check=True)
                argv = HELPER + ["swap"] if who == "helper" else before_argv(BEFORE_SWAP) + ["swap"]
                t, code, _, _, _ = run_accounted(argv, udev=False)
                if code != 0:
                    sys.exit(f"bench: the {who} swap failed while udev was busy")
                busy_at_end[who] += os.path.exists("/run/udev/queue")  # udev still busy when it returned
                walls[who].append(t)
                subprocess.run(["udevadm", "settle"], check=True)  # the other device's event ends, untimed
    BUSY_RULE.unlink()
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    assert_gpus(1)
    return {"busy_rule_s": BUSY_RULE_S, "helper_ms": median_ms(walls["helper"]), "before_helper_ms": median_ms(walls["before"]),
            "udev_still_busy_at_exit": busy_at_end, "samples_ms": {k: ms(v) for k, v in walls.items()},
            "vs_before": paired_ratio(walls["helper"], walls["before"])}


# The stdlib modules the helper's full path imports anyway; each library's cost is what importing
# it (and, for pyudev, making the helper's Monitor) adds to them.
STDLIB = "import ctypes, fcntl, json, pathlib, signal, subprocess, typing"
LIBRARIES = {
    "pyudev": "import pyudev; m = pyudev.Monitor.from_netlink(pyudev.Context(), source='udev'); m.filter_by('module'); m.start()",
    "packaging": "import packaging.version",
    "systemd-python": "from systemd import journal",
}
# What argparse costs the helper's command line (its import, gettext's and locale's, and building
# cli.py's parser), which the units' own command lines no longer pay (quick.parse_unit_argv).
CLI = f"{STDLIB}; from nvidia_kmod_swap import cli"
ARGPARSE = f"{CLI}; cli._parser().parse_args(['--config', {CONFIG!r}, 'swap'])"


def library_costs(runs: int = 10) -> dict[str, float]:
    """ms each library of the full path adds to a start of the helper, measured here (interleaved
    medians of fresh interpreters): what the swap pays for them, against the before helper; and
    what argparse would add to the unit's swap."""
    argvs = {"stdlib": STDLIB, **{name: f"{STDLIB}; {code}" for name, code in LIBRARIES.items()},
             "cli": CLI, "argparse": ARGPARSE}
    samples: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, code in argvs.items():
            samples[name].append(run(["/usr/bin/python3", "-c", code])[0])
    base = statistics.median(samples["stdlib"])
    return {"stdlib_ms": round(base * 1000),
            **{f"{name}_ms": round((statistics.median(samples[name]) - base) * 1000) for name in LIBRARIES},
            "argparse_not_paid_ms": round((statistics.median(samples["argparse"]) - statistics.median(samples["cli"])) * 1000)}


def slope(points: dict[int, float]) -> float:
    """Least-squares ms per GPU."""
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs), 3)


def main() -> int:
    out: dict = {"noop_runs": NOOP_RUNS, "swap_runs_per_direction": SWAP_RUNS}
    # The no-op path, as on every start of nvidia-persistenced.
    base = noop("old", before_too=True)
    print(f"bench: no-op {base}", file=sys.stderr, flush=True)  # in the log if a later part fails
    out["noop"] = base
    out["noop_ratio_vs_floor"] = round(base["helper_ms"] / base["floor_ms"], 2)
    if "seed_script_ms" in base:
        out["noop_ratio_vs_seed_script"] = round(base["helper_ms"] / base["seed_script_ms"], 2)
    if "vs_before" in base:
        out["noop_ratio_vs_before"] = base["vs_before"]
        out["before_revision"] = Path("/etc/testbed/before-rev").read_text().strip()
    # Full swaps with 4 modules and 1 GPU, then the scaling runs.
    scale_swap, scale_bare, scale_noop = {}, {}, {}
    for gpus in (1,) if BEFORE_AFTER_ONLY else (1, 8, 32):
        result = swaps(DRIVER, gpus, before_too=gpus == 1)
        out[f"swap_gpus_{gpus}"] = result
        scale_swap[gpus], scale_bare[gpus] = result["helper_ms"], result["bare_ms"]
        scale_noop[gpus] = noop("old")["helper_ms"]
    out["swap_ratio_vs_bare"] = round(out["swap_gpus_1"]["helper_ms"] / out["swap_gpus_1"]["bare_ms"], 2)
    out["library_import_ms"] = library_costs()
    if "before_failed" in out["swap_gpus_1"]:
        out["swap_ratio_vs_before"] = out["swap_gpus_1"].get("vs_before")
        out["before_swap_revision"] = Path("/etc/testbed/before-swap-rev").read_text().strip()
        out["swap_udev_busy"] = busy_udev_swaps(DRIVER)
        out["swap_ratio_vs_before_udev_busy"] = out["swap_udev_busy"]["vs_before"]
    if not BEFORE_AFTER_ONLY:
        out["swap_ms_per_gpu"] = slope(scale_swap)
        out["bare_ms_per_gpu"] = slope(scale_bare)
        out["noop_ms_per_gpu"] = slope(scale_noop)
        with_peermem = swaps(DRIVER + ["nvidia-peermem"], 1)
        out["swap_5_modules"] = with_peermem
        out["swap_ratio_5_vs_4_modules"] = round(with_peermem["helper_ms"] / out["swap_gpus_1"]["helper_ms"], 2)
    out["max_rss_kib"] = {"noop": base["max_rss_kib"],
                          "swap": max(v["max_rss_kib"] for v in out.values() if isinstance(v, dict) and "max_rss_kib" in v)}

    def no_slower(key: str) -> bool | None:
        """Shown when the 95% interval of after/before lies at or below 1 (None: not measured)."""
        ratio = out.get(key)
        return None if not ratio else ratio["ci95"][1] <= 1.0

    out["targets"] = {
        "noop no slower than before": no_slower("noop_ratio_vs_before"),
        "swap no slower than before": no_slower("swap_ratio_vs_before"),
        "swap no slower than before, udev busy with another device": no_slower("swap_ratio_vs_before_udev_busy"),
        "noop <= 2x floor": out["noop_ratio_vs_floor"] <= 2,
        "noop <= 0.5x seed script": out["noop_ratio_vs_seed_script"] <= 0.5 if "noop_ratio_vs_seed_script" in out else None,
        "swap <= 1.2x bare": out["swap_ratio_vs_bare"] <= 1.2,
        "per-GPU growth <= bare's": out["swap_ms_per_gpu"] <= max(out["bare_ms_per_gpu"], 0) + 1 if not BEFORE_AFTER_ONLY else None,
        "max RSS <= 30 MiB": max(out["max_rss_kib"].values()) <= 30 * 1024,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
