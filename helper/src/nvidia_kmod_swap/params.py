"""Module parameters the way modprobe would apply them.

insmod (and finit_module) ignore /etc/modprobe.d and `module.param=value` on the kernel command line;
modprobe merges both. NixOS puts `options nvidia NVreg_...` and `nvidia-drm.modeset=1` there, so a swap
that dropped them would change the driver's behaviour. We collect both, config files first and the
command line last (the kernel keeps the last value of a repeated parameter, as with modprobe).
"""

from __future__ import annotations

from pathlib import Path

from .paths import Root

# modprobe's search order; a file name in an earlier directory hides the same name in a later one.
MODPROBE_DIRS = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/local/lib/modprobe.d", "/lib/modprobe.d", "/usr/lib/modprobe.d")


def _norm(name: str) -> str:
    return name.replace("-", "_")


# The booted generation's /etc/modprobe.d on NixOS (its etc, kept until reboot): the options the
# booted driver was loaded with, while /etc already has the new generation's.
BOOTED_MODPROBE_DIR = "/run/booted-system/etc/modprobe.d"


def _config_files(root: Root, dirs: tuple[str, ...] = MODPROBE_DIRS) -> list[Path]:
    chosen: dict[str, Path] = {}
    for directory in dirs:
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
    out: list[str] = []
    quoted = space = False
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


def _lines(text: str) -> list[str]:
    """modprobe.d lines as kmod reads them (libkmod-config.c kmod_config_parse): a backslash at the
    end of a line continues it; a line that starts with '#' is a comment. A '#' elsewhere is data:
    `options nvidia NVreg_X=a#b` passes `NVreg_X=a#b`."""
    return [line for line in text.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]


def parse_modprobe_conf(text: str) -> list[tuple[str, str]]:
    """(module, "param=value ...") for each `options` line."""
    options = []
    for line in _lines(text):
        words = line.split(None, 2)
        if len(words) >= 3 and words[0] == "options":
            options.append((_norm(words[1]), _squeeze(words[2])))
    return options


def parse_softdeps(text: str) -> list[tuple[str, list[str]]]:
    """(module, its pre: and post: modules) for each `softdep` line (modprobe.d(5): `softdep
    modulename pre: modules... post: modules...`, optional modules modprobe loads around it).
    nixpkgs' nvidia.nix has `softdep nvidia post: nvidia_uvm` instead of loading nvidia_uvm at boot."""
    softdeps = []
    for line in _lines(text):
        words = line.split()
        if len(words) >= 2 and words[0] == "softdep":
            softdeps.append((_norm(words[1]), [_norm(w) for w in words[2:] if w not in ("pre:", "post:")]))
    return softdeps


def kernel_args(cmdline: str) -> list[tuple[str, str | None]]:
    """(param, value or None) per word, split as the kernel's next_arg (lib/cmdline.c) does:
    white space separates words outside double quotes; `"` toggles quoting and has no escapes;
    quotes around a value, or around the whole word, are dropped. A `'` is an ordinary character."""
    out: list[tuple[str, str | None]] = []
    args = cmdline.lstrip()
    while args:
        quoted = args[0] == '"'
        if quoted:
            args = args[1:]
        in_quote = quoted
        equals = None
        i = 0
        while i < len(args):
            ch = args[i]
            if ch.isspace() and not in_quote:
                break
            if equals is None and ch == "=":
                equals = i
            if ch == '"':
                in_quote = not in_quote
            i += 1
        word, args = args[:i], args[i + 1:].lstrip()
        if equals is None:
            out.append((word[:-1] if quoted and word.endswith('"') else word, None))
            continue
        param, value = word[:equals], word[equals + 1:]
        if value.startswith('"'):
            value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        elif quoted and value.endswith('"'):
            value = value[:-1]
        out.append((param, value))
    return out


def parse_cmdline(cmdline: str) -> list[tuple[str, str]]:
    """(module, "param=value") for each `module.param=value` word of a kernel command line, as
    modprobe takes them (libkmod-config.c kmod_config_parse_kcmdline: a word without a value, or
    with a quote in the module or parameter name, is ignored; a value with spaces is re-quoted)."""
    options = []
    for key, value in kernel_args(cmdline):
        module, dot, param = key.partition(".")
        if value is None or not dot or not module or not param or '"' in key or "/" in module:
            continue
        if any(ch.isspace() for ch in value):
            value = f'"{value}"'
        options.append((_norm(module), f"{param}={value}"))
    return options


def config_texts(root: Root, booted: bool = False) -> list[str]:
    """The text of each modprobe.d file modprobe would read, in its order (unreadable ones skipped).
    BOOTED: as at boot, with the booted generation's /etc/modprobe.d where it is known (None of it
    where it is not: then []), for the options the booted driver was loaded with."""
    if booted:
        if not root(BOOTED_MODPROBE_DIR).is_dir():
            return []
        dirs = (BOOTED_MODPROBE_DIR,) + tuple(d for d in MODPROBE_DIRS if d != "/etc/modprobe.d")
    else:
        dirs = MODPROBE_DIRS
    texts = []
    for path in _config_files(root, dirs):
        try:
            # kmod reads bytes: a Latin-1 comment or value must not stop us (kept as surrogates)
            texts.append(path.read_bytes().decode("utf-8", errors="surrogateescape"))
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
        cmdline = root("/proc/cmdline").read_bytes().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        cmdline = ""
    for module, opt in parse_cmdline(cmdline):
        if module in wanted:
            pieces.setdefault(module, []).append(opt)
    return {module: " ".join(opts) for module, opts in pieces.items()}
