"""Issue 24 §2: activation cost independent of the driver's size. Module facts computed once (at
build time, `nvidia-kmod-swap facts`; or by an earlier run of this boot) are used instead of the
files; a compressed module that must be read is streamed with bounded memory. Each test fails on
the code before (no facts command, every run reads every file, xz decompressed whole)."""

from __future__ import annotations

import json
import lzma
import tracemalloc

import pytest

from fakesys import NEW, OLD, RELEASE, elf_object, make_config, swapper, write_config, write_driver, write_ko
from nvidia_kmod_swap import modinfo
from nvidia_kmod_swap.cli import main
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.facts import module_facts


def test_facts_cover_the_driver_its_dependencies_and_every_extra_module(store):
    tree = write_driver(store, NEW, compression="xz")
    # nvidia-drm needs drm and drm_kms_helper (Debian's 550: depends=drm,drm_kms_helper,nvidia-modeset)
    write_ko(tree / "misc", "nvidia_drm", NEW, depends=("drm", "drm_kms_helper", "nvidia_modeset"), compression="xz")
    write_ko(tree / "kernel/drivers/gpu/drm", "drm", None, depends=())
    write_ko(tree / "kernel/drivers/gpu/drm", "drm_kms_helper", None, depends=("drm",))
    write_ko(tree / "kernel/sound", "snd", None, depends=())  # neither the driver's nor a dependency
    extra = store / "gdrcopy/lib/modules" / RELEASE
    write_ko(extra / "misc", "gdrdrv", "2.4", depends=("nvidia",))
    facts = module_facts([str(tree)], [str(extra)])
    names = sorted(entry["name"] for entry in facts.values())
    assert names == ["drm", "drm_kms_helper", "gdrdrv", "nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_peermem", "nvidia_uvm"], names
    for path, entry in facts.items():
        info = modinfo._read_modinfo(modinfo.Path(path))
        assert entry == modinfo.facts_entry(info, modinfo.os.stat(path).st_size)


def test_the_facts_command_prints_json(store, capsys):
    tree = write_driver(store, NEW)
    assert main(["facts", str(tree)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {e["version"] for e in facts.values()} == {NEW} and len(facts) == 5


@pytest.fixture
def no_reads(monkeypatch):
    """Any read of a module file fails the test: only facts may answer."""
    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(modinfo, "_read_modinfo", refuse)


def test_with_build_time_facts_plan_and_check_read_no_module_file(system, store, tmp_path, capsys, monkeypatch):
    old, new = write_driver(store, OLD, compression="xz"), write_driver(store, NEW, compression="xz")
    facts_file = tmp_path / "module-facts.json"
    facts_file.write_text(json.dumps(module_facts([str(old), str(new)])))
    system.load_driver(OLD)
    config = write_config(tmp_path / "config.json",
                          make_config(store, [new], [old], module_facts=[str(facts_file)]))
    argv = ["--root", str(system.base), "--config", str(config), "--log-target", "stderr"]
    modinfo.forget()

    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(modinfo, "_read_modinfo", refuse)
    assert main([*argv, "plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["action"] == "swap" and {s["version"] for s in plan["load"]} == {NEW}, plan
    assert main([*argv, "check"]) == 0


def test_a_bump_reads_each_store_file_once(system, store, tmp_path, capsys, monkeypatch):
    """Without build-time facts (a booted generation from before them): `check` reads the files
    and leaves their facts in the state directory; the next run of the bump reads none."""
    old, new = write_driver(store, OLD, compression="xz"), write_driver(store, NEW, compression="xz")
    system.load_driver(OLD)
    config = write_config(tmp_path / "config.json", make_config(store, [new], [old]))
    argv = ["--root", str(system.base), "--config", str(config), "--log-target", "stderr"]
    assert main([*argv, "check"]) == 0
    cache = json.loads(system.root("/run/nvidia-kmod-swap/module-facts.json").read_text())
    assert {e["version"] for e in cache.values()} >= {OLD, NEW}
    modinfo.forget()  # the next run is another process

    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(modinfo, "_read_modinfo", refuse)
    assert main([*argv, "check"]) == 0


def test_facts_of_a_changed_file_are_not_used(store):
    """A fact is for a file of that size below the store: another file is read."""
    tree = write_driver(store, NEW)
    path = next(tree.rglob("nvidia.ko"))
    modinfo.remember_below((str(store) + "/",))
    modinfo.add_facts({str(path): {**modinfo.facts_entry(modinfo.read_modinfo(path), 1), "version": "9.9"}})
    assert modinfo.read_modinfo(path).version == NEW


def test_a_compressed_module_is_read_with_bounded_memory(tmp_path):
    """A real nvidia.ko is 74 MB (42 MB as .ko.xz); its .modinfo is a few hundred bytes."""
    body = bytes(range(256)) * (64 << 12)  # 64 MiB of text section
    data = elf_object({"name": "nvidia", "version": NEW, "vermagic": f"{RELEASE} SMP ", "depends": "drm"}, body=body)
    path = tmp_path / "nvidia.ko.xz"
    path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": 1 << 20}]))
    del data, body
    tracemalloc.start()
    try:
        info = modinfo.read_modinfo(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.name, info.version, info.depends) == ("nvidia", NEW, ("drm",))
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a 64 MiB module"


def test_an_option_the_new_module_does_not_declare_is_said(system, store, tmp_path, capsys):
    """Issue 24: the kernel loads a module with an unknown option and only logs it (kernel/params.c
    "unknown parameter ... ignored"): the plan and the journal say it instead of letting a typo pass."""
    old, new = write_driver(store, OLD), write_driver(store, NEW)
    drm = next(new.rglob("nvidia-drm.ko"))
    drm.write_bytes(elf_object({"name": "nvidia_drm", "version": NEW, "depends": "nvidia_modeset",
                                "vermagic": f"{RELEASE} SMP preempt mod_unload modversions ",
                                "parmtype": "modeset:bool"}))
    system.root("/etc/modprobe.d/nvidia.conf").write_text("options nvidia_drm modeset=1 fbdev=1\n")
    system.load_driver(OLD)
    config = write_config(tmp_path / "config.json", make_config(store, [new], [old]))
    argv = ["--root", str(system.base), "--config", str(config), "--log-target", "stderr"]
    assert main([*argv, "plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["notes"] == [f"nvidia_drm {NEW} declares no parameter fbdev=1 (from modprobe.d or the kernel "
                             "command line): the kernel ignores it"], plan["notes"]
    assert main([*argv, "plan"]) == 0
    assert "note:   nvidia_drm" in capsys.readouterr().out
    assert swapper(system, parse(json.loads(config.read_text()))).run() == 0
    assert "declares no parameter fbdev=1" in capsys.readouterr().err


def test_the_kernel_log_since_a_load_began(tmp_path):
    """KernelLog reads /dev/kmsg from its end: one record per read, "prio,seq,time,flags;text"."""
    from nvidia_kmod_swap.effects import KernelLog
    from nvidia_kmod_swap.paths import Root

    kmsg = tmp_path / "dev/kmsg"
    kmsg.parent.mkdir()
    kmsg.write_text("6,1,100,-;an earlier line\n")
    log = KernelLog(Root(tmp_path))
    with kmsg.open("a") as f:
        f.write("3,2,200,-;NVRM: No NVIDIA GPU found.\n")
    assert log.since() == ["NVRM: No NVIDIA GPU found."]
    log.close()


def test_a_module_laid_out_otherwise_is_read_in_a_second_pass(tmp_path, monkeypatch):
    """The first streamed pass keeps a window around vermagic= and the end; what it did not keep
    (here: with both cut to a few bytes) is read in one more pass per range, the same answer."""
    data = elf_object({"name": "nvidia", "version": NEW, "vermagic": f"{RELEASE} SMP ", "depends": "drm"},
                      body=b"\x90" * (1 << 16))
    path = tmp_path / "nvidia.ko.xz"
    path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    expected = modinfo.read_modinfo(path)
    modinfo.forget()
    monkeypatch.setattr(modinfo, "_WINDOW", 4)
    monkeypatch.setattr(modinfo, "_TAIL", 8)
    reads = []
    real = modinfo._read_range
    monkeypatch.setattr(modinfo, "_read_range", lambda p, o, n: reads.append((o, n)) or real(p, o, n))
    assert modinfo.read_modinfo(path) == expected
    assert len(reads) >= 2, reads  # the section table and .modinfo at least
