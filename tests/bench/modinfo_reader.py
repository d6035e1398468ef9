#!/usr/bin/env python3
"""The .modinfo reader of this revision against the one of an earlier revision (which read each
file whole) and against pyelftools doing the same work (the library the design names for it), in
one run, on the host (no root, ~30 s).

    tests/bench/modinfo_reader.py [--before REV] [--runs N]

Each sample is a fresh interpreter that imports the reader and reads the .modinfo of some of the
host kernel's real modules (tests/setup installs the kernel), as the helper's full path does once
per plan: "small" is 8 modules of the sizes a driver's have (what a plan reads), "large" is the
largest module of the host's kernel (amdgpu.ko, 19 MB: a GPU driver's module of that order). The
three run interleaved; the output is one JSON object of medians (ms), peak RSS (KiB) and the ratios
after/before and pyelftools/after. The reader's import is in the time: it is paid once per
full-path process. The pyelftools arm reads .modinfo as tests/unit/test_readers.py's reference
does, plus the section bounds checks the helper makes (pyelftools does not).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEFORE = "79291bb"  # the last revision with the hand-written reader
# Each child prints its peak RSS: VmHWM of its own memory map (wait4's ru_maxrss would report the
# parent's, which a vfork()ed child inherits until it execs).
PEAK = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
READ = ("import sys\nfrom pathlib import Path\nfrom nvidia_kmod_swap.modinfo import read_modinfo\n"
        "for p in sys.argv[1:]:\n    read_modinfo(Path(p))\n" + PEAK)
READ_PYELFTOOLS = """import os, sys
from elftools.elf.elffile import ELFFile
for p in sys.argv[1:]:
    with open(p, "rb") as f:
        elf, size = ELFFile(f), os.fstat(f.fileno()).st_size
        assert elf["e_shoff"] + elf["e_shentsize"] * elf.num_sections() <= size
        for section in elf.iter_sections():
            assert section["sh_type"] == "SHT_NOBITS" or section["sh_offset"] + section["sh_size"] <= size
            if section.name == ".modinfo":
                section.data()
""" + PEAK


def sources(rev: str | None, into: Path) -> Path:
    """The helper's package at REV (None: the working tree) under INTO, for PYTHONPATH."""
    if rev is None:
        return REPO / "helper/src"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "helper/src/nvidia_kmod_swap"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "helper/src"


def sample(pythonpath: Path | None, files: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS KiB) of one interpreter reading FILES with the helper's reader found on
    PYTHONPATH, or (None) with pyelftools."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath or "")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", READ_PYELFTOOLS if pythonpath is None else READ, *files], env=env,
                          stdout=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"modinfo_reader: reading {files} failed")
    return elapsed, int(proc.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the earlier reader (default {BEFORE})")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    modules = sorted(Path("/lib/modules").glob("*/kernel/**/*.ko"), key=lambda p: p.stat().st_size)
    if not modules:
        sys.exit("modinfo_reader: no kernel modules under /lib/modules (run tests/setup)")
    # A driver's modules but nvidia.ko are 0.1-2 MB: 8 of the host's modules around 1 MB.
    middle = min(range(len(modules)), key=lambda i: abs(modules[i].stat().st_size - (1 << 20)))
    cases = {"small": [str(p) for p in modules[middle - 4: middle + 4]], "large": [str(modules[-1])]}
    out: dict[str, object] = {"before_revision": args.before, "runs": args.runs,
                              "large_file": {"path": cases["large"][0], "bytes": modules[-1].stat().st_size}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"after": sources(None, Path(tmp)), "before": sources(args.before, Path(tmp)), "pyelftools": None}
        for name, files in cases.items():
            samples: dict[str, list[tuple[float, int]]] = {side: [] for side in paths}
            for _ in range(args.runs):
                for side, path in paths.items():
                    samples[side].append(sample(path, files))
            result: dict[str, float] = {}
            for side in paths:
                result[f"{side}_ms"] = round(statistics.median(t for t, _ in samples[side]) * 1000, 1)
                result[f"{side}_peak_rss_kib"] = max(r for _, r in samples[side])
            for ratio, (a, b) in {"after_vs_before": ("after", "before"), "pyelftools_vs_after": ("pyelftools", "after")}.items():
                result[f"time_{ratio}"] = round(result[f"{a}_ms"] / result[f"{b}_ms"], 2)
                result[f"rss_{ratio}"] = round(result[f"{a}_peak_rss_kib"] / result[f"{b}_peak_rss_kib"], 2)
            out[name] = result
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
