"""The no-op fast path: answers only when it is sure, otherwise hands over to the full CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fakesys import NEW, OLD, make_config, write_config, write_driver
from nvidia_kmod_swap.quick import try_noop

SRC = str(Path(__file__).resolve().parents[2] / "helper" / "src")


@pytest.fixture
def current(system, store, tmp_path):
    system.load_driver(NEW)
    config = write_config(tmp_path / "c.json", make_config(store, [write_driver(store, NEW)], [write_driver(store, OLD)]))
    return system, config


def args(system, config, command="check"):
    return ["--root", str(system.base), "--config", str(config), "--log-target", "stderr", command]


def test_versions_match(current, capsys):
    system, config = current
    assert try_noop(args(system, config)) == 0
    assert capsys.readouterr().err == ""
    assert try_noop(args(system, config, "swap")) == 0


def test_hands_over_whenever_unsure(current, tmp_path):
    system, config = current
    data = json.loads(config.read_text())
    assert try_noop(args(system, config, "plan")) is None
    assert try_noop(args(system, config) + ["--json"]) is None
    system.change("nvidia_uvm", version=OLD)
    assert try_noop(args(system, config)) is None                   # a half-swapped driver
    system.change("nvidia_uvm", version=NEW)
    (system.root(data["state_dir"])).mkdir(parents=True)
    (system.root(data["state_dir"]) / "swap.json").write_text("{}")
    assert try_noop(args(system, config)) is None                   # an interrupted swap
    (system.root(data["state_dir"]) / "swap.json").unlink()
    for bad in ({**data, "typo": 1}, {**data, "driver_version": 5}, [data]):
        write_config(tmp_path / "bad.json", bad)
        assert try_noop(args(system, tmp_path / "bad.json")) is None
    (tmp_path / "broken.json").write_text("{")
    assert try_noop(args(system, tmp_path / "broken.json")) is None
    system.modules.clear()
    system.sync()
    assert try_noop(args(system, config)) is None                   # nothing loaded


def test_imports_nothing_heavy(current):
    system, config = current
    code = (f"import sys; from nvidia_kmod_swap.cli import main; rc = main({args(system, config, 'swap')!r}); "
            "heavy = [m for m in ('argparse', 'dataclasses', 'nvidia_kmod_swap.plan', 'nvidia_kmod_swap.swap', "
            "'systemd', 'pyudev', 'zstandard', 'packaging', 'typing', 'datetime', 'json', 're', 'enum', 'socket') if m in sys.modules]; print(rc, heavy)")
    # -S: no site-packages hooks (an editable install's finder imports typing), as a packaged helper runs
    first = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "0 ['json', 're', 'enum']", first  # json writes driver-<version>.json, once
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out


# Documents json.loads takes, refuses, or takes in its own way (CPython Lib/json/decoder.py:
# only " \t\n\r" around the document, NaN/Infinity as floats, the last of duplicate keys, control
# characters refused in strings): rules.loads_json must give the same value or the same error.
JSON_DOCUMENTS = [
    '{"driver_version": "580.95.05", "module_dirs": ["/nix/store/x"]}',
    ' \t\n\r{"a": 1}\r\n\t ', "[]", '"text"', "0", "-0.0", "1e400", "123456789012345678901234567890",
    "NaN", "Infinity", "-Infinity", "nan", "true", "null", '{"a": 1, "a": 2}', '{"a": "\\ud800"}',
    '{"a": "\udcff"}', '{"a": "\\u00e9\\n"}', "", " ", "{", '{"a": 1} x', '{"a": 1}{}', '{"a": 1}\x0b',
    "\x0c{}", "\ufeff{}", '{"a": "tab\there"}', '{"a": 01}', '{"a": .5}', "{'a': 1}", '{"a": [1, 2,]}',
    '{"a": "\\x41"}', "[" * 100_000 + "]" * 100_000, '{"a": 1}\u00a0',
]


def _outcome(loads, text):
    try:
        return "value", json.dumps(loads(text), sort_keys=True, ensure_ascii=True, default=repr)
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("text", JSON_DOCUMENTS, ids=range(len(JSON_DOCUMENTS)))
def test_config_decoder_is_json_loads(text):
    from nvidia_kmod_swap.rules import loads_json

    assert _outcome(loads_json, text) == _outcome(json.loads, text)


def test_config_decoder_without_the_c_scanner(monkeypatch):
    """A Python without _json (PyPy, a stripped build): json.loads itself, same values."""
    from nvidia_kmod_swap.rules import loads_json

    monkeypatch.setitem(sys.modules, "_json", None)
    for text in JSON_DOCUMENTS[:6] + ["{", "[1] 2"]:
        assert _outcome(loads_json, text) == _outcome(json.loads, text)


def test_journal_entry_imports_nothing_heavy(tmp_path):
    """The no-op path's journal entry on a machine with journald: the datagram arrives, and
    neither json nor socket (which imports enum) was imported for it."""
    path = tmp_path / "journal.sock"
    code = (f"import sys; from nvidia_kmod_swap.journal import send_native; import _socket\n"
            f"server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM); server.bind({str(path)!r})\n"
            f"ok = send_native({{'MESSAGE': 'm', 'MESSAGE_ID': 'x'}}, {str(path)!r})\n"
            "heavy = [m for m in ('json', 're', 'enum', 'socket', 'typing') if m in sys.modules]\n"
            "print(ok, server.recv(4096), heavy)")
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True b'MESSAGE=m\\nMESSAGE_ID=x\\n' []", out


def test_deeply_nested_config_hands_over(current, tmp_path):
    system, _ = current
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert try_noop(args(system, tmp_path / "deep.json")) is None


# Command lines around the units' own (`--config FILE swap`): parse_unit_argv answers the first
# list without argparse and hands the second to it; where it answers, argparse must agree.
UNIT_ARGVS = [
    ["--config", "/c.json", "swap"], ["--config", "/c.json", "check"], ["--config", "/c.json", "retry-deferred"],
    ["--config=/c.json", "check"], ["retry-deferred"], ["--root", "/r", "--config", "/c.json", "--log-target", "stderr", "swap"],
    ["--log-target=journal", "--root=/r", "check"], ["--config", "a", "--config", "b", "swap"],
    ["--config=-c.json", "swap"], ["--config", "check", "swap"],
]
ARGPARSE_ARGVS = [  # argparse reads these otherwise, or refuses them
    ["--config", "/c.json", "swap", "--retry"], ["swap", "--config", "/c.json"], ["--conf", "/c.json", "swap"],
    ["--config", "-c.json", "swap"], ["--config=", "swap"], ["--log-target", "syslog", "swap"],
    ["--config", "/c.json"], ["--config"], [], ["plan"], ["status", "--json"], ["--help"], ["-h", "swap"],
    ["--", "swap"], ["swap", "check"], ["--config", "/c.json", "swap", "swap"], ["-", "swap"], ["--root"],
]


@pytest.mark.parametrize("argv", UNIT_ARGVS + ARGPARSE_ARGVS, ids=[" ".join(a) or "empty" for a in UNIT_ARGVS + ARGPARSE_ARGVS])
def test_unit_argv_means_what_argparse_makes_of_it(argv, capsys):
    from nvidia_kmod_swap import cli
    from nvidia_kmod_swap.quick import parse_unit_argv

    unit = parse_unit_argv(argv)
    assert (unit is not None) == (argv in UNIT_ARGVS)
    try:
        parsed = vars(cli._parser().parse_args(argv))
    except SystemExit:
        parsed = None
    capsys.readouterr()
    if unit is not None:
        assert parsed is not None, f"argparse refuses {argv}"
        fast = vars(cli._unit_args(unit))
        assert {k: fast[k] for k in parsed} == parsed


def test_swap_path_does_not_import_argparse(tmp_path):
    """The unit's swap (versions differ) gets past its command line without argparse (nor the
    gettext and locale it imports); --help still goes through it."""
    code = ("import sys; from nvidia_kmod_swap.cli import main\n"
            f"rc = main(['--root', {str(tmp_path)!r}, '--config', {str(tmp_path / 'missing.json')!r}, '--log-target', 'stderr', 'swap'])\n"
            "print(rc, [m for m in ('argparse', 'gettext', 'locale') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "255 []", out
    assert "config" in out.stderr
    out = subprocess.run([sys.executable, "-S", "-m", "nvidia_kmod_swap", "--help"], env={"PYTHONPATH": SRC},
                         capture_output=True, text=True, check=True)
    assert "retry-deferred" in out.stdout
