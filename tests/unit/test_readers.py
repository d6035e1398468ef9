"""The read-only readers: config validation, module files, parameters, holders, snapshots."""

from __future__ import annotations

import io
import json
import lzma
import random
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from fakesys import NEW, OLD, RELEASE, elf_object, write_ko
from nvidia_kmod_swap import config as config_mod
from nvidia_kmod_swap import params
from nvidia_kmod_swap.holders import find_holders, unit_of
from nvidia_kmod_swap.modinfo import ModuleFileError, ModuleFiles, parse_modinfo, read_modinfo
from nvidia_kmod_swap.snapshot import read_snapshot

MINIMAL = {"driver_version": NEW, "kernel_release": RELEASE, "module_dirs": ["/nix/store/x"]}


def test_config_defaults():
    cfg = config_mod.parse(MINIMAL)
    assert cfg.on_busy == "defer" and cfg.on_kernel_change == "defer"
    assert cfg.modules == ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")
    assert cfg.allowed_prefixes == ("/nix/store/",) and cfg.verify_command is None


@pytest.mark.parametrize("patch, words", [
    ({"driver_version": 570}, "'driver_version'"),
    ({"module_dirs": ["relative/dir"]}, "not an absolute path"),
    ({"module_dirs": []}, "at least one"),
    ({"on_busy": "kill"}, "expected one of defer, fail, stop-units"),
    ({"on_busy": "stop-units"}, "'stop_units'"),
    ({"verify_command": ["nvidia-smi"]}, "must be an absolute path"),
    ({"verify_command": []}, "'verify_command'"),
    ({"settle_timeout_s": True}, "'settle_timeout_s'"),
    ({"state_dir": "run/x"}, "'state_dir'"),
    ({"extra": 1}, "unknown key(s) 'extra'"),
])
def test_config_errors_name_the_key(patch, words):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse({**MINIMAL, **patch})
    assert words in str(e.value)


def test_config_missing_keys_and_top_level():
    with pytest.raises(config_mod.ConfigError, match="'kernel_release'"):
        config_mod.parse({"driver_version": NEW, "module_dirs": ["/x"]})
    with pytest.raises(config_mod.ConfigError, match="JSON object"):
        config_mod.parse([1])


def test_config_module_names_normalized(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**MINIMAL, "modules": ["nvidia", "nvidia-uvm"]}))
    assert config_mod.load(path).modules == ("nvidia", "nvidia_uvm")


@pytest.mark.parametrize("compression", ["", "xz", "zst"])
def test_modinfo_reads_plain_and_compressed(tmp_path, compression):
    path = write_ko(tmp_path, "nvidia_drm", NEW, compression=compression)
    info = read_modinfo(path)
    assert (info.name, info.version, info.kernel_release) == ("nvidia_drm", NEW, RELEASE)
    assert info.depends == ("nvidia_modeset", "nvidia")


def test_modinfo_rejects_bad_files(tmp_path):
    good = write_ko(tmp_path, "nvidia", NEW)
    data = good.read_bytes()
    cases = {"trunc.ko": data[: len(data) - 40], "text.ko": b"hello", "short.ko": data[:100]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModuleFileError):
            read_modinfo(tmp_path / name)
    (tmp_path / "bad.ko.xz").write_bytes(b"not xz")
    with pytest.raises(ModuleFileError, match="bad xz"):
        read_modinfo(tmp_path / "bad.ko.xz")


@pytest.mark.parametrize("bits, endian", [(64, "<"), (64, ">"), (32, "<"), (32, ">")])
def test_modinfo_reads_32_and_64_bit_objects_of_either_byte_order(tmp_path, bits, endian):
    path = tmp_path / "nvidia.ko"
    fields = {"name": "nvidia", "version": NEW, "vermagic": f"{RELEASE} SMP mod_unload ", "depends": ""}
    path.write_bytes(elf_object(fields, bits=bits, endian=endian))
    info = read_modinfo(path)
    assert (info.name, info.version, info.kernel_release, info.depends) == ("nvidia", NEW, RELEASE, ())


def test_modinfo_refuses_what_the_kernel_would(tmp_path):
    """kernel/module/main.c (elf_validity_check) refuses a section header size other than
    sizeof(Elf_Shdr) and a section table past the end of the file; so do we, in words."""
    good = elf_object({"name": "nvidia", "vermagic": f"{RELEASE} SMP "})
    bad_entsize = bytearray(good)
    bad_entsize[0x3A] = 40  # e_shentsize of an ELF64 object
    (tmp_path / "entsize.ko").write_bytes(bad_entsize)
    with pytest.raises(ModuleFileError, match="section header size 40"):
        read_modinfo(tmp_path / "entsize.ko")
    (tmp_path / "cut.ko").write_bytes(good[:-10])
    with pytest.raises(ModuleFileError, match="truncated or corrupt: its section headers end at byte"):
        read_modinfo(tmp_path / "cut.ko")
    (tmp_path / "text.ko").write_bytes(b"#!/bin/sh\n" * 20)
    with pytest.raises(ModuleFileError, match="not an ELF file"):
        read_modinfo(tmp_path / "text.ko")


def test_modinfo_does_not_read_a_large_module_whole(tmp_path):
    """A real GPU module has tens of MB (the host's amdgpu.ko has 19 MB); a plan reads the
    .modinfo of the old and the new driver's, so only the header, the section table and .modinfo
    may be read."""
    path = tmp_path / "nvidia.ko"
    path.write_bytes(elf_object({"name": "nvidia", "vermagic": f"{RELEASE} SMP "}, body=b"\x90" * (64 << 20)))
    read_modinfo(path)  # once before measuring, so that only the read itself is traced
    tracemalloc.start()
    try:
        info = read_modinfo(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.name == "nvidia" and peak < 2 << 20, f"{peak} bytes allocated to read a 64 MiB module"


def host_modules() -> list[Path]:
    """Every 40th real module of the host's kernels, and the largest one."""
    found = sorted(Path("/lib/modules").glob("*/kernel/**/*.ko*"))
    return [*found[::40], max(found, key=lambda p: p.stat().st_size)] if found else []


def test_modinfo_agrees_with_kmods_modinfo_on_real_modules(tmp_path):
    """kmod's own modinfo(8) is the reference, over real modules of the host's kernel (tests/setup
    installs one), plain and compressed with xz and zstd as kmod reads them."""
    modules = host_modules()
    if not modules or not shutil.which("modinfo"):
        pytest.skip("no kernel modules or kmod here (a Nix build sandbox)")
    for extra in [m for m in modules if m.suffix == ".ko"][:3]:
        for tool, suffix in (("xz", ".xz"), ("zstd", ".zst")):
            copy = tmp_path / f"{tool}-{extra.name}"
            shutil.copyfile(extra, copy)
            subprocess.run([tool, "-q", "-f", str(copy)], check=True)
            modules.append(copy.with_name(copy.name + suffix))
    keys = ("name", "version", "vermagic", "depends", "srcversion")
    for path in modules:
        info = read_modinfo(path)
        ours = [info.name, info.version, info.vermagic, ",".join(info.depends), info.srcversion]
        theirs = {}
        for key in keys:
            out = subprocess.run(["modinfo", "-F", key, str(path)], capture_output=True, text=True, check=True).stdout
            theirs[key] = out.rstrip("\n").replace("-", "_") if key == "depends" else out.rstrip("\n")
        assert ours == [theirs[k] or (None if k in ("version", "srcversion") else "") for k in keys], (path, theirs)
    assert len(modules) > 50


def plain_bytes(path: Path) -> bytes:
    """The ELF object of a module file, decompressed here with the libraries' own decoders (Debian's
    6.12 kernels ship .ko.xz) rather than with the reader under test."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def pyelftools_modinfo(data: bytes) -> dict[str, list[str]] | None:
    """The .modinfo fields as pyelftools reads them (the reference), or None where it cannot."""
    try:
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
        return None if section is None else parse_modinfo(section.data())
    except (ELFError, ValueError, KeyError, IndexError, TypeError, OverflowError):
        return None


def fields_of(info) -> dict[str, str | None]:
    return {"name": info.name, "version": info.version, "vermagic": info.vermagic, "srcversion": info.srcversion,
            "depends": ",".join(info.depends)}


def reference_fields(fields: dict[str, list[str]], path: Path) -> dict[str, str | None]:
    first = {key: values[0] for key, values in fields.items()}
    return {"name": first.get("name", path.name.split(".")[0].replace("-", "_")), "version": first.get("version"),
            "vermagic": first["vermagic"], "srcversion": first.get("srcversion"),
            "depends": ",".join(d.replace("-", "_") for d in ",".join(fields.get("depends", [])).split(",") if d)}


def test_modinfo_agrees_with_pyelftools(tmp_path):
    """pyelftools reads 32- and 64-bit ELF of either byte order: the reference for modinfo.py's
    reader, over the host's real modules and our 32/64-bit, little/big-endian objects."""
    synthetic = []
    for bits in (32, 64):
        for endian in "<>":
            path = tmp_path / f"nvidia-{bits}{'le' if endian == '<' else 'be'}.ko"
            fields = {"name": "nvidia", "version": NEW, "vermagic": f"{RELEASE} SMP ", "depends": "drm,i2c-core"}
            path.write_bytes(elf_object(fields, bits=bits, endian=endian))
            synthetic.append(path)
    for path in [*synthetic, *host_modules()]:
        reference = pyelftools_modinfo(plain_bytes(path))
        assert reference is not None, path
        assert fields_of(read_modinfo(path)) == reference_fields(reference, path), path


def test_modinfo_never_returns_what_is_not_in_a_damaged_file(tmp_path):
    """Cut at every length and with bytes changed in its header and section table, a module is
    either refused with ModuleFileError (never another exception) or read as pyelftools reads it."""
    good = elf_object({"name": "nvidia", "version": NEW, "vermagic": f"{RELEASE} SMP ", "depends": ""}, body=b"\x90" * 200)
    header_and_table = [*range(64), *range(len(good) - 4 * 64, len(good))]
    rng = random.Random(0)
    damaged = [good[:cut] for cut in range(len(good))]
    for _ in range(600):
        data = bytearray(good)
        for at in rng.sample(header_and_table, rng.randint(1, 3)):
            data[at] = rng.randrange(256)
        damaged.append(bytes(data))
    agreed = refused = 0
    path = tmp_path / "nvidia.ko"
    for data in damaged:
        path.write_bytes(data)
        try:
            ours = fields_of(read_modinfo(path))
        except ModuleFileError:
            refused += 1
            continue
        reference = pyelftools_modinfo(data)
        if reference is not None:
            assert ours == reference_fields(reference, path), data
            agreed += 1
    assert refused > len(good) and agreed > 100, (refused, agreed)


def test_module_files_in_both_layouts(tmp_path):
    write_ko(tmp_path / "a/misc", "nvidia_uvm", NEW)
    write_ko(tmp_path / "b/kernel/drivers/video", "nvidia", NEW, compression="xz")
    found = ModuleFiles([str(tmp_path / "a"), str(tmp_path / "b")])
    assert found.get("nvidia_uvm") == [tmp_path / "a/misc/nvidia-uvm.ko"]
    assert found.get("nvidia") == [tmp_path / "b/kernel/drivers/video/nvidia.ko.xz"]
    assert found.get("nvidia_drm") == []


def test_modprobe_options_and_cmdline(tmp_path):
    from nvidia_kmod_swap.paths import Root
    root = Root(tmp_path)
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "usr/lib/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/nvidia.conf").write_text(
        "# comment\noptions nvidia NVreg_A=1 \\\n  NVreg_B=2\noptions nvidia NVreg_RegistryDwords=\"a;  b\"\noptions nvidia-drm modeset=1\nblacklist nouveau\n")
    (tmp_path / "usr/lib/modprobe.d/nvidia.conf").write_text("options nvidia NVreg_HIDDEN=1\n")  # hidden by /etc's
    (tmp_path / "usr/lib/modprobe.d/other.conf").write_text("options nvidia_uvm uvm_perf=1\noptions e1000 x=1\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text('quiet nvidia.NVreg_A=3 nvidia_drm.fbdev=1 foo.bar="a b" init=/x\n')
    got = params.collect(root, {"nvidia", "nvidia_drm", "nvidia-uvm"})
    assert got == {"nvidia": "NVreg_A=1 NVreg_B=2 NVreg_RegistryDwords=\"a;  b\" NVreg_A=3", "nvidia_drm": "modeset=1 fbdev=1", "nvidia_uvm": "uvm_perf=1"}


def test_unit_of_cgroup_lines():
    assert unit_of("0::/system.slice/ollama.service\n") == "ollama.service"
    assert unit_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n") == "app-foo.scope"
    assert unit_of("1:name=systemd:/system.slice/x.service\n2:cpu:/\n") == "x.service"
    assert unit_of("0::/\n") is None


def test_holders_and_snapshot(system):
    system.load_driver(OLD, names=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem"))
    system.add("gdrdrv", "2.4.4", ("nvidia",))
    system.add("e1000", None, ())
    system.hold_device(10, "Xorg", None, "/dev/nvidiactl")
    holders = find_holders(system.root)
    assert [(h.pid, h.comm, h.path, h.unit) for h in holders] == [(10, "Xorg", "/dev/nvidiactl", "session-2.scope")]
    snap = read_snapshot(system.root)
    assert snap.family() == ["gdrdrv", "nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_peermem", "nvidia_uvm"]
    assert snap.modules["nvidia"].holders >= {"gdrdrv", "nvidia_peermem"}
    assert snap.modules["nvidia"].refcnt == 6
    assert snap.version("nvidia") == OLD and snap.kernel_release == RELEASE


def test_journal_entries_in_the_native_format(tmp_path):
    """What journald receives: a real datagram socket stands in for /run/systemd/journal/socket."""
    import socket

    from nvidia_kmod_swap.journal import MESSAGE_IDS, Reporter

    path = str(tmp_path / "journal.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        Reporter("journal", socket_path=path).event("rolled-back", "rolled back:\nline two", "err",
                                                    reason="uvm", holder_pids=[1, 2], modules=())
        data = server.recv(65536)
    assert data.startswith(b"MESSAGE\n" + len(b"rolled back:\nline two").to_bytes(8, "little") + b"rolled back:\nline two\n")
    fields = dict(line.split("=", 1) for line in data.decode().split("\n")[3:] if "=" in line)
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["rolled-back"] and fields["PRIORITY"] == "3"
    assert fields["NVIDIA_REASON"] == "uvm" and fields["NVIDIA_HOLDER_PIDS"] == "1 2"
    assert "NVIDIA_MODULES" not in fields and fields["SYSLOG_IDENTIFIER"] == "nvidia-kmod-swap"
    assert fields["CODE_FUNC"] == "test_journal_entries_in_the_native_format" and fields["CODE_FILE"] == __file__


def _depmod_tree(tmp_path):
    """A module tree with modules.dep as depmod writes it: paths relative to the tree, deps after ':'."""
    tree = tmp_path / "lib/modules" / RELEASE
    write_ko(tree / "kernel/drivers/video", "nvidia", NEW)
    write_ko(tree / "kernel/drivers/video", "nvidia_drm", NEW)
    write_ko(tree / "kernel/drivers/gpu/drm", "drm", None, depends=(), compression="xz")
    (tree / "modules.dep").write_text(
        "kernel/drivers/gpu/drm/drm.ko.xz:\n"
        "kernel/drivers/video/nvidia.ko:\n"
        "kernel/drivers/video/nvidia-drm.ko: kernel/drivers/video/nvidia.ko kernel/drivers/gpu/drm/drm.ko.xz\n")
    return tree


def test_module_files_come_from_modules_dep_without_walking(tmp_path, monkeypatch):
    from nvidia_kmod_swap import modinfo

    tree = _depmod_tree(tmp_path)

    def no_walk(top):
        raise AssertionError(f"walked {top}")

    monkeypatch.setattr(modinfo, "_walk", no_walk)
    files = modinfo.ModuleFiles([str(tree)])
    assert files.get("nvidia") == [tree / "kernel/drivers/video/nvidia.ko"]  # not nvidia-drm.ko, not a dependency
    assert files.get("nvidia_drm") == [tree / "kernel/drivers/video/nvidia-drm.ko"]
    assert files.get("drm") == [tree / "kernel/drivers/gpu/drm/drm.ko.xz"]


def test_module_files_walk_when_modules_dep_lacks_the_name_or_is_stale(tmp_path):
    from nvidia_kmod_swap.modinfo import ModuleFiles

    tree = _depmod_tree(tmp_path)
    write_ko(tree / "updates", "nvidia_uvm", NEW)  # added without depmod
    assert ModuleFiles([str(tree)]).get("nvidia_uvm") == [tree / "updates/nvidia-uvm.ko"]
    (tree / "kernel/drivers/video/nvidia.ko").rename(tree / "updates/nvidia.ko")  # the index names a gone file
    assert ModuleFiles([str(tree)]).get("nvidia") == [tree / "updates/nvidia.ko"]


def _depmod(tree, release=RELEASE):
    """Indexes TREE (…/lib/modules/<release>) with the real depmod, as aggregateModules does."""
    import shutil
    import subprocess

    depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
    assert depmod, "depmod (kmod) is needed to index a module tree"
    subprocess.run([depmod, "-b", str(tree.parents[2]), release], check=True, capture_output=True)


def test_module_files_come_from_modules_dep_bin_as_modprobe_reads_it(tmp_path, monkeypatch):
    """kmod's trie (libkmod-index.c): the key is the underscore name whatever the file's spelling,
    and of two files for one module it holds depmod's choice, the one modprobe loads."""
    from nvidia_kmod_swap import modinfo

    tree = tmp_path / "lib/modules" / RELEASE
    write_ko(tree / "kernel/drivers/video", "nvidia", NEW)
    write_ko(tree / "misc", "nvidia", OLD)
    (tree / "kernel/arch/x86/crypto").mkdir(parents=True)
    write_ko(tree / "kernel/arch/x86/crypto", "twofish_x86_64", None, depends=()).rename(
        tree / "kernel/arch/x86/crypto/twofish-x86_64.ko")  # mixed spelling, as in Debian's kernel
    _depmod(tree)
    chosen = (tree / "modules.dep").read_text().split("nvidia.ko")[0].rsplit("\n", 1)[-1] + "nvidia.ko"
    monkeypatch.setattr(modinfo, "_walk", lambda top: (_ for _ in ()).throw(AssertionError(f"walked {top}")))
    monkeypatch.setattr(modinfo.DepmodIndex, "read", classmethod(lambda cls, top: None))  # the trie alone
    files = modinfo.ModuleFiles([str(tree)])
    assert files.get("nvidia") == [tree / chosen]
    assert files.get("twofish_x86_64") == [tree / "kernel/arch/x86/crypto/twofish-x86_64.ko"]
    index = modinfo.DepmodBinIndex.read(str(tree))
    assert index.get("nvidia_uvm") is None and index.get("nvidi") is None and index.get("nvidiax") is None


def test_a_corrupt_modules_dep_bin_falls_back_to_modules_dep(tmp_path):
    from nvidia_kmod_swap.modinfo import DepmodBinIndex, ModuleFiles

    tree = _depmod_tree(tmp_path)
    (tree / "modules.dep.bin").write_bytes(b"\xb0\x07\xf4\x57\x00\x09\x00\x01garbage")  # another major version
    assert DepmodBinIndex.read(str(tree)) is None
    assert ModuleFiles([str(tree)]).get("nvidia") == [tree / "kernel/drivers/video/nvidia.ko"]
    (tree / "modules.dep.bin").write_bytes(b"\xb0\x07\xf4\x57\x00\x02\x00\x01\x20\x00\x00\x0c\xff")  # truncated
    assert ModuleFiles([str(tree)]).get("nvidia") == [tree / "kernel/drivers/video/nvidia.ko"]


def test_udev_watch_waits_for_processed_add_events_only():
    """pyudev's Monitor.poll (pyudev/monitor.py): the next Device, or None when the timeout ran out."""
    import time

    from nvidia_kmod_swap.devices import UdevWatch
    from nvidia_kmod_swap.paths import Root

    class Event:
        def __init__(self, action, name):
            self.action, self.sys_name = action, name

    class Monitor:
        def __init__(self, events):
            self.events = list(events)

        def poll(self, timeout=None):
            return self.events.pop(0) if self.events else None

    watch = UdevWatch(Root(Path("/nonexistent")))  # not the live root: no monitor, nothing to wait for
    assert watch.monitor is None and watch.wait_added({"nvidia"}, time.monotonic() + 1) == {"nvidia"}
    watch.monitor = Monitor([Event("remove", "nvidia"), Event("add", "nvidia_modeset"), Event("add", "nvidia")])
    assert watch.wait_added({"nvidia", "nvidia_modeset"}, time.monotonic() + 1) == set()
    watch.monitor = Monitor([Event("add", "nvidia_drm")])
    assert watch.wait_added({"nvidia_uvm"}, time.monotonic() + 1) == {"nvidia_uvm"}  # timed out


def test_udev_word_replaces_waiting_for_its_whole_queue(system):
    """Other devices' events can keep /run/udev/queue for seconds; once udev has said it processed
    our modules' add events, the nodes are checked without waiting for the rest."""
    import time

    from fakesys import FakeEffects
    from nvidia_kmod_swap import devices

    system.load_driver(NEW)
    system.root("/run/udev").mkdir(parents=True)
    system.root("/run/udev/queue").write_text("")  # busy with someone else's events

    class Event:
        action, sys_name = "add", ""

    class Monitor:
        def __init__(self):
            self.events = []
            for name in ("nvidia", "nvidia_modeset", "nvidia_uvm"):
                event = Event()
                event.sys_name = name
                self.events.append(event)

        def poll(self, timeout=None):
            return self.events.pop(0) if self.events else None

    watch = devices.UdevWatch(system.root)
    watch.monitor = Monitor()
    started = time.monotonic()
    loaded = set(system.modules)
    assert devices.wait_for_nodes(system.root, loaded, 2.0, FakeEffects(system), watch=watch, loaded_now=loaded) == []
    assert time.monotonic() - started < 1.0
    # without udev's word (no monitor: polling), the busy queue is waited for, and said
    assert devices.wait_for_nodes(system.root, loaded, 0.2, FakeEffects(system)) == ["udev is still processing events"]


def test_journal_entries_through_systemd_python(monkeypatch):
    """python-systemd's journal.send(MESSAGE, MESSAGE_ID=None, ..., **kwargs) (systemd/journal.py):
    MESSAGE as text, every other field a keyword; bytes go to the journal as they are."""
    import sys
    import types

    from nvidia_kmod_swap.journal import MESSAGE_IDS, send_systemd

    sent = []
    fake = types.ModuleType("systemd.journal")

    def send(MESSAGE, MESSAGE_ID=None, CODE_FILE=None, CODE_LINE=None, CODE_FUNC=None, **kwargs):
        args = ["MESSAGE=" + MESSAGE]
        if MESSAGE_ID is not None:
            args.append("MESSAGE_ID=" + getattr(MESSAGE_ID, "hex", MESSAGE_ID))  # a str or a UUID, as send() does
        if CODE_LINE is CODE_FILE is CODE_FUNC is None:  # send() then looks its caller up in the stack
            CODE_FILE, CODE_LINE, CODE_FUNC = "<extract_stack>", 0, "<extract_stack>"
        if CODE_LINE is not None:
            args.append("CODE_LINE={:d}".format(CODE_LINE))  # an int, or send() raises  # noqa: UP032
        sent.append((MESSAGE, {"MESSAGE_ID": MESSAGE_ID, "CODE_FILE": CODE_FILE, "CODE_LINE": CODE_LINE,
                               "CODE_FUNC": CODE_FUNC, **kwargs}))

    fake.send = send
    package = types.ModuleType("systemd")
    package.journal = fake
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", fake)
    assert send_systemd({"MESSAGE": "caf\udce9 refused", "MESSAGE_ID": MESSAGE_IDS["refused"], "NVIDIA_REASON": "caf\udce9"})
    message, fields = sent[0]
    assert message == "caf\ufffd refused" and fields["NVIDIA_REASON"] == b"caf\xe9"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["refused"]
    # Through a Reporter, the entry names the helper's own place that reported it, not send_systemd
    # (and send() needs no stack walk for it).
    from nvidia_kmod_swap.journal import Reporter

    sent.clear()
    reporter = Reporter("stderr", sender=send_systemd)
    reporter.to_journal, reporter.also_stderr = True, False
    reporter.event("refused", "no")
    line = sys._getframe().f_lineno - 1
    _, fields = sent[0]
    assert (fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"]) == (__file__, line, "test_journal_entries_through_systemd_python")


def test_status_history_from_the_journal():
    """Entries as systemd.journal.Reader gives them (newest first here): the last swap's outcome,
    and a deferral still pending (the newest decisions), since the first of them."""
    from datetime import datetime

    from nvidia_kmod_swap.journal import summarize

    def entry(event, minute, **fields):
        return {"NVIDIA_EVENT": event, "__REALTIME_TIMESTAMP": datetime(2026, 11, 25, 12, minute), "MESSAGE": event,
                **{f"NVIDIA_{k.upper()}": v for k, v in fields.items()}}

    entries = [entry("deferred", 50, reason="pid 7 holds /dev/nvidia0", expected_version="580.65.06"),
               entry("deferred", 40, reason="pid 7 holds /dev/nvidia0"),
               entry("swapped", 30, loaded_version=NEW, previous_version=OLD),
               entry("deferred", 20, reason="older"),
               entry("rolled-back", 10, loaded_version=OLD, expected_version=NEW)]
    history = summarize(entries)
    assert history["last_swap"] == {"when": "2026-11-25 12:30:00", "result": "swapped", "from": OLD, "to": NEW,
                                    "message": "swapped"}
    assert history["pending"] == {"since": "2026-11-25 12:40:00", "why": "pid 7 holds /dev/nvidia0",
                                  "expected_version": "580.65.06"}
    assert summarize(entries[2:])["pending"] is None
    assert summarize(entries[4:])["last_swap"]["result"] == "rolled-back"
    assert summarize([]) == {"last_swap": None, "pending": None}
