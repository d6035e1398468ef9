"""The helper's configuration: one JSON file, written by the NixOS module from Nix attributes.
Its keys and their validation are in rules.py, which the no-op fast path shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .rules import DEFAULT_CONFIG, DEFAULT_MODULES, DEFAULT_STATE_DIR, ConfigError, loads_json, validate

DEFAULT_PATH = Path(DEFAULT_CONFIG)

__all__ = ["Config", "ConfigError", "DEFAULT_PATH", "SlurmConfig", "load", "parse"]


class Config(NamedTuple):
    """The NixOS module's JSON config (docs/helper.md), validated by rules.validate."""

    driver_version: str
    kernel_release: str
    module_dirs: tuple[str, ...]
    modules: tuple[str, ...] = DEFAULT_MODULES
    rollback_dirs: tuple[str, ...] = ()
    on_busy: str = "defer"
    on_kernel_change: str = "defer"
    stop_units: tuple[str, ...] = ()
    verify_command: tuple[str, ...] | None = None
    settle_timeout_s: float = 10.0
    state_dir: str = DEFAULT_STATE_DIR
    allowed_prefixes: tuple[str, ...] = ("/nix/store/",)
    gc_root_dir: str | None = None  # where the loaded driver's files get a Nix GC root (NixOS sets it)
    firmware_path: str | None = None  # this generation's firmware dir (NixOS: hardware.firmware/lib/firmware)
    kernel_image: str | None = None  # this generation's kernel image (NixOS: ${kernel}/${kernelFile})
    busy_grace_s: float = 5.0  # how long a holder may take to close /dev/nvidia* (NVML opens it briefly)
    lock_timeout_s: float = 60.0  # how long to wait for another run's lock
    swap_unit: str = "nvidia-persistenced.service"  # the unit whose start runs `swap`
    gpu_units: tuple[str, ...] = ()  # units ordered after the swap, run again after a deferred swap
    # graphics.nix's driver links of this generation, (link, environment), and its nvidia-smi:
    # what a pin to this driver points at while a later generation waits for its swap (userspace.py).
    driver_links: tuple[tuple[str, str], ...] | None = None
    nvidia_smi: str | None = None
    # JSON files of module facts computed at build time (`nvidia-kmod-swap facts`, the NixOS
    # module's module-facts derivation): the module files they cover are not read at activation.
    module_facts: tuple[str, ...] = ()
    # Slurm as the swap's gate on a node of a GPU fleet (fleet.py): drain, swap when idle, resume.
    slurm: SlurmConfig | None = None


class SlurmConfig(NamedTuple):
    node: str                 # this node's NodeName in slurm.conf
    scontrol: str             # the scontrol to run
    max_unavailable: str = "1"  # nodes drained by us at once: a count, or a percentage of the partition
    partition: str | None = None  # what a percentage is of (every node without one)
    settle_s: float = 5.0     # after our drain, how long until we read the fleet again (fleet.py)
    # Slurm's own units that hold the GPU outside any job (slurmd with AutoDetect=nvml keeps NVML
    # open): stopped for the swap once the node is drained without a job, started again after.
    units: tuple[str, ...] = ("slurmd.service",)


def parse(data: object) -> Config:
    values = validate(data)
    if values.get("slurm") is not None:
        values["slurm"] = SlurmConfig(**values["slurm"])
    return Config(**values)


def load(path: Path) -> Config:
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    try:
        data = loads_json(text)  # the no-op path's decoder, so both paths take the same files
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from e
    return parse(data)
