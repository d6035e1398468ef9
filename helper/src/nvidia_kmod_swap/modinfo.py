"""Reads kernel module files (.ko, .ko.xz, .ko.zst): the .modinfo section of the ELF object.

This is what `modinfo FILE` shows: name, version, vermagic, depends, srcversion. Read-only.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


class ModuleFileError(Exception):
    """A module file that cannot be read or is not a kernel module."""


class ModInfo(NamedTuple):
    """What `modinfo FILE` shows of a module file (its .modinfo section) that a plan needs."""

    path: Path
    name: str
    version: str | None
    vermagic: str
    depends: tuple[str, ...]
    srcversion: str | None
    # The parameters it declares (its `parmtype=` lines; None: not known): an option that is not
    # among them is ignored by the kernel with only a log line, a typo gone unseen.
    params: tuple[str, ...] | None = None

    @property
    def kernel_release(self) -> str:
        """The release a module was built for: the first word of its vermagic."""
        return self.vermagic.split(" ", 1)[0]


def module_name(path: Path) -> str:
    """Kernel name of a module file: nvidia-uvm.ko.zst -> nvidia_uvm."""
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


COMPRESSED = (".xz", ".zst")  # what kmod decompresses in userspace


def read_bytes(path: Path) -> bytes:
    """The module's ELF image, decompressed in userspace as kmod does."""
    data = path.read_bytes()
    return _decompress(data, path) if path.name.endswith(COMPRESSED) else data


def _decompress(data: bytes, path: Path) -> bytes:
    if path.name.endswith(".xz"):
        import lzma

        try:
            return lzma.decompress(data)
        except lzma.LZMAError as e:
            raise ModuleFileError(f"{path}: bad xz data: {e}") from e
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as e:
        raise ModuleFileError(f"{path}: bad zstd data: {e}") from e


# The System V gABI's ELF header and section header, by EI_CLASS (1: ELF32, 2: ELF64): the format
# and offset of e_shoff, the offset of e_shentsize/e_shnum/e_shstrndx, and Elf_Shdr's first six
# fields (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size) and size. Checked against
# pyelftools and kmod's modinfo by tests/unit/test_readers.py.
_LAYOUTS = {1: ("I", 0x20, 0x2E, "IIIIII", 40), 2: ("Q", 0x28, 0x3A, "IIQQQQ", 64)}
_SHT_NOBITS = 8


def _modinfo_section(read: Callable[[int, int], bytes], size: int, path: Path) -> bytes:
    """The .modinfo section of the ELF object of SIZE bytes that READ(offset, length) reads: the
    header, the section table, the section names and .modinfo, never the whole file (the host's
    amdgpu.ko has 19 MB; a plan reads the old and the new driver's modules). 32- and 64-bit objects
    of either byte order. Refused as the kernel refuses them (kernel/module/main.c,
    elf_validity_check: "Invalid ELF section header size", "... header overflow", a section name
    index out of range, contents past the end but for SHT_NOBITS), so that a module cut short by a
    full disk or an interrupted copy is refused before anything is unloaded, not by init_module."""
    header = read(0, 64)
    if len(header) < 16 or header[:4] != b"\x7fELF":
        raise ModuleFileError(f"{path}: not an ELF file")
    layout, endian = _LAYOUTS.get(header[4]), {1: "<", 2: ">"}.get(header[5])
    if layout is None or endian is None:
        raise ModuleFileError(f"{path}: corrupt ELF object: class {header[4]}, byte order {header[5]}")
    offset_format, shoff_at, counts_at, shdr_format, shdr_size = layout
    try:
        (shoff,) = struct.unpack_from(endian + offset_format, header, shoff_at)
        shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", header, counts_at)
    except struct.error as e:  # struct's own words ("unpack_from requires a buffer...") help nobody
        raise ModuleFileError(f"{path}: truncated or corrupt ELF header") from e
    if shentsize != shdr_size:
        raise ModuleFileError(f"{path}: corrupt ELF object: section header size {shentsize}, not {shdr_size}")
    if shoff >= size or shnum * shdr_size > size - shoff:
        raise ModuleFileError(
            f"{path}: truncated or corrupt: its section headers end at byte {shoff + shnum * shdr_size}, the file has {size}")
    if shstrndx == 0 or shstrndx >= shnum:
        raise ModuleFileError(f"{path}: corrupt ELF object: section name table {shstrndx} of {shnum} sections")
    table = read(shoff, shnum * shdr_size)
    if len(table) != shnum * shdr_size:
        raise ModuleFileError(f"{path}: truncated while being read")
    sections = [struct.unpack_from(endian + shdr_format, table, i * shdr_size) for i in range(shnum)]
    for index, (_name, stype, _flags, _addr, offset, length) in enumerate(sections):
        if stype != _SHT_NOBITS and offset + length > size:
            raise ModuleFileError(f"{path}: truncated or corrupt: section {index} ends at byte {offset + length}, the file has {size}")
    names = read(sections[shstrndx][4], sections[shstrndx][5])
    for name, stype, _flags, _addr, offset, length in sections:
        end = names.find(b"\0", name)
        if end >= 0 and names[name:end] == b".modinfo" and stype != _SHT_NOBITS:
            section = read(offset, length)
            if len(section) != length:
                raise ModuleFileError(f"{path}: truncated while being read")
            return section
    raise ModuleFileError(f"{path}: no .modinfo section: not a kernel module")


def parse_modinfo(section: bytes) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for entry in section.split(b"\0"):
        if b"=" in entry:
            key, _, value = entry.decode(errors="surrogateescape").partition("=")
            fields.setdefault(key, []).append(value)
    return fields


# What is known of module files without reading them: facts computed at build time (the NixOS
# module's module-facts derivation, `nvidia-kmod-swap facts`), or read earlier in this boot (the
# state directory's cache), or earlier in this process. Keyed by the resolved path and the file's
# size: store paths never change, and a size that differs means another file. A real nvidia.ko.xz
# is 42 MB of xz to decompress for a few hundred bytes of .modinfo (docs/performance.md).
# Only files below IMMUTABLE (the config's allowed_prefixes: the Nix store) are remembered; any
# other file is read every time.
_KNOWN: dict[tuple[str, int], tuple[str, str | None, str, tuple[str, ...], str | None, tuple[str, ...] | None]] = {}
_READ: set[tuple[str, int]] = set()  # what this process read itself (worth keeping for the next)
_IMMUTABLE: list[tuple[str, ...]] = [("/nix/store/",)]


def remember_below(prefixes: tuple[str, ...]) -> None:
    """Facts are kept and used for files below PREFIXES only (store paths, which never change)."""
    _IMMUTABLE[0] = tuple(prefixes)


def forget() -> None:
    """Drops every fact (tests: one process, many trees)."""
    _KNOWN.clear()
    _READ.clear()
    _IMMUTABLE[0] = ("/nix/store/",)


def facts_entry(info: ModInfo, size: int) -> dict[str, object]:
    """A module file's facts as `nvidia-kmod-swap facts` writes them (keyed by its resolved path)."""
    return {"size": size, "name": info.name, "version": info.version, "vermagic": info.vermagic,
            "depends": list(info.depends), "srcversion": info.srcversion,
            "params": None if info.params is None else list(info.params)}


def add_facts(entries: object) -> int:
    """Registers facts (resolved path -> facts_entry); returns how many were taken. Entries that
    are not well-formed are skipped: a file is then read, not guessed."""
    taken = 0
    if not isinstance(entries, dict):
        return 0
    for path, e in entries.items():
        if (isinstance(path, str) and isinstance(e, dict) and isinstance(e.get("size"), int)
                and isinstance(e.get("name"), str) and isinstance(e.get("vermagic"), str) and e["vermagic"]
                and isinstance(e.get("depends"), list) and all(isinstance(d, str) for d in e["depends"])
                and isinstance(e.get("version"), (str, type(None)))
                and isinstance(e.get("srcversion"), (str, type(None)))):
            params = e.get("params")
            declared = tuple(params) if isinstance(params, list) and all(isinstance(x, str) for x in params) else None
            _KNOWN[(path, e["size"])] = (e["name"], e["version"], e["vermagic"], tuple(e["depends"]), e["srcversion"],
                                         declared)
            taken += 1
    return taken


def read_facts() -> dict[str, dict[str, object]]:
    """The facts this process read from module files itself, for the state directory's cache."""
    return {path: facts_entry(ModInfo(Path(path), *_KNOWN[(path, size)]), size) for path, size in sorted(_READ)}


def read_modinfo(path: Path) -> ModInfo:
    try:
        resolved = os.path.realpath(path)
        size = os.stat(resolved).st_size
    except OSError as e:
        raise ModuleFileError(f"{path}: {e.strerror}") from e
    if not resolved.startswith(_IMMUTABLE[0]):
        return _read_modinfo(path)
    known = _KNOWN.get((resolved, size))
    if known is not None:
        return ModInfo(path, *known)
    info = _read_modinfo(path)
    _KNOWN[(resolved, size)] = info[1:]
    _READ.add((resolved, size))
    return info


def _read_modinfo(path: Path) -> ModInfo:
    try:
        if path.name.endswith(COMPRESSED):
            section = _stream_modinfo(path)
        else:
            with open(path, "rb") as f:
                fd = f.fileno()
                section = _modinfo_section(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size, path)
    except OSError as e:
        raise ModuleFileError(f"{path}: {e.strerror}") from e
    fields = parse_modinfo(section)
    vermagic = (fields.get("vermagic") or [""])[0]
    if not vermagic:
        raise ModuleFileError(f"{path}: no vermagic: not a loadable module")
    depends = tuple(d.replace("-", "_") for d in ",".join(fields.get("depends", [])).split(",") if d)
    return ModInfo(
        path=path,
        name=(fields.get("name") or [module_name(path)])[0],
        version=_first(fields, "version"),
        vermagic=vermagic,
        depends=depends,
        srcversion=_first(fields, "srcversion"),
        params=tuple(dict.fromkeys(p.split(":", 1)[0] for p in fields.get("parmtype", []))),
    )


_CHUNK = 1 << 20  # decompressed bytes per step of a stream


class _Stream:
    """PATH's decompressed bytes, a bounded piece at a time (xz: max_length; zstd: what one input
    chunk gives)."""

    def __init__(self, path: Path) -> None:
        import lzma

        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.xz: lzma.LZMADecompressor | None = None
        self.zst: Any = None
        if path.name.endswith(".xz"):
            self.xz = lzma.LZMADecompressor()
        else:
            import zstandard

            self.zst = zstandard.ZstdDecompressor().decompressobj()
        self.done = False

    def read(self) -> bytes:
        """The next piece; b"" at the end."""
        while not self.done:
            if self.xz is not None:
                data = self.file.read(_CHUNK) if self.xz.needs_input else b""
                if self.xz.needs_input and not data:
                    self.done = True
                    break
                out = self.xz.decompress(data, max_length=_CHUNK)
                self.done = self.xz.eof
            else:
                data = self.file.read(_CHUNK)
                if not data:
                    self.done = True
                    break
                out = bytes(self.zst.decompress(data))
            if out:
                return out
        return b""

    def close(self) -> None:
        self.file.close()


def _read_range(path: Path, offset: int, length: int) -> bytes:
    """LENGTH decompressed bytes of PATH from OFFSET, in one pass that keeps only them (fewer at
    the end of the data: the caller's checks refuse a range cut short)."""
    kept = bytearray()
    position = 0
    stream = _Stream(path)
    try:
        while len(kept) < length and (out := _checked(path, stream.read)):
            end = position + len(out)
            lo, hi = max(offset + len(kept), position), min(offset + length, end)
            if lo < hi:
                kept += out[lo - position: hi - position]
            position = end
    finally:
        stream.close()
    return bytes(kept)


_WINDOW = 1 << 16  # kept around "vermagic=" in the first pass: .modinfo is a few hundred bytes
_TAIL = 1 << 19  # kept at the end: the section table and, before it, the section names


def _checked(path: Path, read: Callable[[], bytes]) -> bytes:
    """READ(), with a decompressor's error as the ModuleFileError it is."""
    import lzma

    try:
        return read()
    except lzma.LZMAError as e:
        raise ModuleFileError(f"{path}: bad xz data: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise ModuleFileError(f"{path}: bad zstd data: {e}") from e
        raise


def _first_pass(path: Path) -> tuple[list[tuple[int, bytes]], int]:
    """One pass over PATH's decompressed bytes keeping, besides the ELF header, a window around the
    first "vermagic=" (where .modinfo is) and the last _TAIL bytes (a module's section names and
    section table end it): what is needed, in the usual layout, without a second pass. Returns
    the kept spans ((offset, bytes)) and the size."""
    stream = _Stream(path)
    position = 0
    previous = b""
    header = b""
    window: bytearray | None = None
    window_start = window_end = 0
    tail = b""
    try:
        while out := _checked(path, stream.read):
            end = position + len(out)
            if len(header) < 64:
                header += out[: 64 - len(header)]
            if window is None:
                joined = previous + out
                at = joined.find(b"vermagic=")
                if at >= 0:
                    base = position - len(previous)
                    window_start = max(base, base + at - _WINDOW)
                    window_end = base + at + _WINDOW
                    window = bytearray(joined[window_start - base: window_end - base])
            elif len(window) < window_end - window_start:
                window += out[: window_end - window_start - len(window)]
            previous = out
            tail = (tail + out)[-_TAIL:]
            position = end
    finally:
        stream.close()
    spans = [(0, header), (position - len(tail), tail)]
    if window is not None:
        spans.append((window_start, bytes(window)))
    return spans, position


def _stream_modinfo(path: Path) -> bytes:
    """.modinfo of a compressed module with bounded memory (kmod decompresses it whole, as this
    helper did: 208 MB for the real 550 tree's nvidia.ko.xz): one pass keeping the ELF header, the
    window where .modinfo is and the end (section names and table); a second pass only for what a
    module laid out otherwise keeps elsewhere."""
    spans, size = _first_pass(path)
    extra: dict[tuple[int, int], bytes] = {}

    def read(offset: int, length: int) -> bytes:
        if (offset, length) in extra:
            return extra[(offset, length)]
        for start, data in spans:
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start: offset - start + length]
        raise _Missing(offset, length)

    for _ in range(4):  # header -> table -> names -> .modinfo: each may be missing once
        try:
            return _modinfo_section(read, size, path)
        except _Missing as missing:
            extra[(missing.offset, missing.length)] = _read_range(path, missing.offset, missing.length)
    return _modinfo_section(read, size, path)


class _Missing(Exception):
    """A range the first pass did not keep."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self.offset, self.length = offset, length


def _first(fields: dict[str, list[str]], key: str) -> str | None:
    values = fields.get(key)
    return values[0] if values else None


class DepmodIndex:
    """TOP/modules.dep, depmod's index of a module tree (what modprobe reads), searched by name.

    A NixOS module tree has one (aggregateModules runs depmod over it). Finding a name in it is a
    byte search of one file, where walking the tree's ~4,000 symlinked modules is a directory read
    each and splitting all its lines costs more than the search. Nothing is checked here;
    ModuleFiles checks the files it hands out.
    """

    def __init__(self, top: str, data: bytes) -> None:
        self.top, self.data = top, data

    @classmethod
    def read(cls, top: str) -> DepmodIndex | None:
        try:
            with open(os.path.join(top, "modules.dep"), "rb") as f:
                return cls(top, f.read())
        except OSError:
            return None

    def get(self, name: str) -> list[str] | None:
        """Paths relative to the tree of the files of module NAME (either spelling), or None."""
        found: list[str] = []
        data = self.data
        for spelling in dict.fromkeys((name, name.replace("_", "-"))):
            needle = os.fsencode(spelling) + b".ko"
            at = data.find(needle)
            while at >= 0:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b":", at)
                tail = data[at + len(needle): end] if end >= 0 else b"?"
                if (at == start or data[at - 1: at] == b"/") and tail in (b"", b".xz", b".zst"):
                    found.append(os.fsdecode(data[start:end]))
                at = data.find(needle, at + 1)
        return found or None


class DepmodBinIndex:
    """TOP/modules.dep.bin, the trie modprobe itself searches (kmod's libkmod-index.c format:
    magic 0xB007F457, version 2.x, big-endian u32 offsets whose high nibble says which of prefix,
    children and values a node has). Mapped, not read: a lookup touches the few nodes on the
    key's path, so its cost does not grow with the tree. Key: the module name (underscores);
    value: its modules.dep line, "relative/path.ko: deps" (depmod's choice among duplicates)."""

    MAGIC, MAJOR = 0xB007F457, 2
    PREFIX, VALUES, CHILDS, MASK = 0x80000000, 0x40000000, 0x20000000, 0x0FFFFFFF

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data
        magic, version, self.root = struct.unpack_from(">III", data, 0)
        if magic != self.MAGIC or version >> 16 != self.MAJOR:
            raise ValueError("not a kmod index")

    @classmethod
    def read(cls, top: str) -> DepmodBinIndex | None:
        try:
            with open(os.path.join(top, "modules.dep.bin"), "rb") as f:
                return cls(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError, struct.error):
            return None

    def _cstr(self, at: int) -> tuple[bytes, int]:
        end = self.data.find(b"\0", at)
        if end < 0:
            raise ValueError("unterminated string")
        return self.data[at:end], end + 1

    def lookup(self, key: bytes) -> bytes | None:
        """The first (lowest priority) value of KEY, or None (libkmod-index.c index_search)."""
        offset, i = self.root, 0
        while offset & self.MASK:
            at = offset & self.MASK
            if offset & self.PREFIX:
                prefix, at = self._cstr(at)
                if key[i:i + len(prefix)] != prefix:
                    return None
                i += len(prefix)
            first = last = -1
            children_at = 0
            if offset & self.CHILDS:
                first, last = self.data[at], self.data[at + 1]
                children_at, at = at + 2, at + 2 + 4 * (last - first + 1)
            if i == len(key):
                if not offset & self.VALUES:
                    return None
                (count,) = struct.unpack_from(">I", self.data, at)
                at += 4
                values = []
                for _ in range(count):
                    (priority,) = struct.unpack_from(">I", self.data, at)
                    value, at = self._cstr(at + 4)
                    values.append((priority, value))
                return min(values)[1] if values else None
            if not first <= key[i] <= last:
                return None
            (offset,) = struct.unpack_from(">I", self.data, children_at + 4 * (key[i] - first))
            i += 1
        return None

    def get(self, name: str) -> list[str] | None:
        """Path relative to the tree of module NAME's file, as a one-element list, or None."""
        try:
            line = self.lookup(os.fsencode(name.replace("-", "_")))
        except (ValueError, struct.error, IndexError):
            return None
        return None if line is None else [os.fsdecode(line.split(b":", 1)[0])]


def _walk(top: str) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames.sort()  # a deterministic order when a tree has two files for one module
        for filename in sorted(filenames):
            if filename.endswith(SUFFIXES):
                path = Path(dirpath) / filename
                found.setdefault(module_name(path), []).append(path)
    return found


class ModuleFiles:
    """Kernel name -> module files below some directories, in the order of the directories, looked
    up by name. Per directory: modprobe's own index (modules.dep.bin) when it has one, else
    modules.dep, when the files it names exist; a name the index lacks (a file added without
    depmod), a stale index or a directory without one is walked, once. Nothing is parsed here.
    over() shares the caches with other directories."""

    def __init__(self, dirs: list[str] | tuple[str, ...]) -> None:
        self.dirs = list(dirs)
        self._indexes: dict[str, DepmodBinIndex | DepmodIndex | None] = {}
        self._walks: dict[str, dict[str, list[Path]]] = {}

    def _walked(self, top: str) -> dict[str, list[Path]]:
        if top not in self._walks:
            self._walks[top] = _walk(top)
        return self._walks[top]

    def get(self, name: str) -> list[Path]:
        return [path for _, path in self.get_with_dirs(name)]

    def names(self) -> list[str]:
        """Every module name below the directories (walked: for `facts`, at build time)."""
        return sorted({name for top in self.dirs for name in self._walked(top)})

    def get_with_dirs(self, name: str) -> list[tuple[str, Path]]:
        """(module directory, file) for each file of NAME, in the order of the directories."""
        found: list[tuple[str, Path]] = []
        for top in self.dirs:
            if top not in self._indexes:  # modprobe's trie when there is one, else the text index
                self._indexes[top] = DepmodBinIndex.read(top) or DepmodIndex.read(top)
            index = self._indexes[top]
            relative = index.get(name) if index is not None else None
            hits = [Path(top) / r for r in relative] if relative is not None else None
            if hits is not None and not all(p.exists() for p in hits):
                self._indexes[top] = hits = None  # a stale index: walk this directory instead
            found += [(top, p) for p in (hits if hits is not None else self._walked(top).get(name, []))]
        return found

    def over(self, dirs: list[str] | tuple[str, ...]) -> ModuleFiles:
        """The same caches, other directories."""
        view = ModuleFiles(dirs)
        view._indexes, view._walks = self._indexes, self._walks
        return view
