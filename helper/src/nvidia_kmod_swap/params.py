"""Module parameters the way modprobe would apply them.

insmod (and finit_module) ignore /etc/modprobe.d and `module.param=value` on the kernel command line;
modprobe merges both. NixOS puts `options nvidia NVreg_...` and `nvidia-drm.modeset=1` there, so a swap
that dropped them would change the driver's behaviour. We collect both, config files first and the
command line last (the kernel keeps the last value of a repeated parameter, as with modprobe).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .paths import Root

# modprobe's search order; a file name in an earlier directory hides the same name in a later one.
MODPROBE_DIRS = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/local/lib/modprobe.d", "/lib/modprobe.d", "/usr/lib/modprobe.d")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _config_files(root: Root) -> list[Path]:
    chosen: dict[str, Path] = {}
    for directory in MODPROBE_DIRS:
        try:
            entries = sorted(root(directory).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.endswith(".conf") and entry.name not in chosen and entry.is_file():
                chosen[entry.name] = entry
    return [chosen[name] for name in sorted(chosen)]


def _squeeze(text: str) -> str:
    """Collapses runs of white space outside double quotes (continuation lines leave some)."""
    out, quoted, space = [], False, False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
        if ch.isspace() and not quoted:
            space = True
            continue
        if space and out:
            out.append(" ")
        space = False
        out.append(ch)
    return "".join(out)


def parse_modprobe_conf(text: str) -> list[tuple[str, str]]:
    """(module, "param=value ...") for each `options` line; continuation lines joined."""
    options = []
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        words = line.split(None, 2)
        if len(words) >= 3 and words[0] == "options":
            options.append((_norm(words[1]), _squeeze(words[2])))
    return options


def parse_softdeps(text: str) -> list[tuple[str, list[str]]]:
    """(module, its pre: and post: modules) for each `softdep` line (modprobe.d(5): `softdep
    modulename pre: modules... post: modules...`, optional modules modprobe loads around it).
    nixpkgs' nvidia.nix has `softdep nvidia post: nvidia_uvm` instead of loading nvidia_uvm at boot."""
    softdeps = []
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "softdep":
            softdeps.append((_norm(words[1]), [_norm(w) for w in words[2:] if w not in ("pre:", "post:")]))
    return softdeps


def parse_cmdline(cmdline: str) -> list[tuple[str, str]]:
    """(module, "param=value") for each `module.param[=value]` word of a kernel command line."""
    options = []
    try:
        words = shlex.split(cmdline)
    except ValueError:
        words = cmdline.split()
    for word in words:
        key, eq, value = word.partition("=")
        module, dot, param = key.partition(".")
        if not dot or not module or not param or "/" in module:
            continue
        if " " in value:
            value = f'"{value}"'
        options.append((_norm(module), f"{param}{eq}{value}"))
    return options


def config_texts(root: Root) -> list[str]:
    """The text of each modprobe.d file modprobe would read, in its order (unreadable ones skipped)."""
    texts = []
    for path in _config_files(root):
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    return texts


def softdeps(texts: list[str]) -> dict[str, list[str]]:
    """module -> the modules modprobe.d says modprobe loads with it (softdep pre: and post:)."""
    found: dict[str, list[str]] = {}
    for text in texts:
        for module, deps in parse_softdeps(text):
            found.setdefault(module, []).extend(deps)
    return found


def collect(root: Root, modules: list[str] | set[str], texts: list[str] | None = None) -> dict[str, str]:
    """module -> parameter string for insmod, for each of MODULES that has any. TEXTS: the
    modprobe.d files, when the caller has read them already (config_texts)."""
    wanted = {_norm(m) for m in modules}
    pieces: dict[str, list[str]] = {}
    for text in config_texts(root) if texts is None else texts:
        for module, opts in parse_modprobe_conf(text):
            if module in wanted:
                pieces.setdefault(module, []).append(opts)
    try:
        cmdline = root("/proc/cmdline").read_text()
    except FileNotFoundError:
        cmdline = ""
    for module, opt in parse_cmdline(cmdline):
        if module in wanted:
            pieces.setdefault(module, []).append(opt)
    return {module: " ".join(opts) for module, opts in pieces.items()}
