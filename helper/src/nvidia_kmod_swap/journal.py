"""Reporting: structured journal entries with a plain stderr fallback, and reading them back.

Each event has a fixed MESSAGE_ID so that `journalctl MESSAGE_ID=...` finds it; docs/helper.md
lists them. Fields carry versions, modules and holders; MESSAGE says the same for a human.

Entries go through systemd-python's `systemd.journal.send` (sd_journal_sendv). The one exception is
the no-op fast path (quick.py, every start of the unit), which writes the same datagram to
journald's native socket itself (`send_native`) so that it imports nothing: importing
systemd.journal costs 23 ms on the host, ~10x that under the test bed's emulation. A Python without
systemd-python (a checkout run by hand) falls back to that writer too. `status` reads the last
decisions back with `systemd.journal.Reader`, matched by MESSAGE_ID.
"""

from __future__ import annotations

import os
import sys

# Annotations only (mypy's always_true makes TYPE_CHECKING true for it): importing typing costs
# the no-op path, which runs on every start of the unit, 7 ms on the host, ten times that emulated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"

MESSAGE_IDS = {
    "noop": "8f0cf8de96516352941d2006d9a066e4",
    "plan": "4b8d9ae7e0d2b4deb600b800a39785f7",
    "deferred": "9fe8e531736c1dc5083670ecb04065a8",
    "refused": "d4144ba374c8dde0fedd3a03bfbd5bad",
    "step": "b19adb3d7e20bc25ed860cf96af4e5af",
    "swapped": "00c82c6b51fd2c716e2e6ec106ede9e1",
    "failed": "18d62293e15ce6c64d48e52f1acf9be9",
    "rolled-back": "2eba4c38277bd89942580e9d702c7462",
    "rollback-failed": "c3e586f76f864658fbc7b4889c05b145",
    "recovery": "83e67c33970d5f25bd6c8dc98a768d1c",
    "busy": "da6789f7f1d2c902d9951e4bd50cbf72",
    "retry": "6b9eb30a623d41ea84b8a4faf7ef3628",
    "pinned": "3f6c1a0e5d2b4e8f9a7c6d5e4b3a2918",
    "unpinned": "7a2e9c4b1d6f4a3e8b5c0d9e2f1a6b47",
    "unpinnable": "c58d2e7f3a9b4c1d8e6f0a2b5c7d9e13",
    "drained": "24f222f9dd57f2a9132656e7b9ea7f84",
    "resumed": "0369cc591a7e5e40bd2b1fa95ab7f25b",
    "fleet": "a0dc2ff94216ca2632356fb0c0157852",
}
PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "err": 3, "crit": 2}


def native_entry(fields: dict[str, str]) -> bytes:
    """One journal entry in journald's native format: KEY=value lines, or, for a value with a
    newline, KEY, newline, its length as 64-bit little endian, the value, newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def send_native(fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> bool:
    """True when journald took the entry."""
    # _socket, the C module socket.py wraps: socket.py imports enum (~80 ms of the no-op path's start
    # in the test bed's guest) for its IntEnum families, which a datagram does not need.
    import _socket

    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        sock.sendto(native_entry(fields), socket_path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def send_systemd(fields: dict[str, str]) -> bool:
    """True when systemd-python's journal.send took the entry; False when it is not installed or
    journald refused it."""
    try:
        from systemd import journal
    except ImportError:
        return send_native(fields)
    entry = dict(fields)
    # MESSAGE must be text (UTF-8); other fields may be bytes, sent as they are: a byte read from a
    # file that is not UTF-8 (kept as a surrogate) goes to the journal as that byte.
    # MESSAGE_ID must be a str (or UUID): send() adds its `.hex` or itself to "MESSAGE_ID=".
    message = entry.pop("MESSAGE").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    message_id = entry.pop("MESSAGE_ID")
    # The caller's place, given: send() only looks it up itself (traceback.extract_stack, which
    # reads the source through linecache) when none of the three is, and would name this function.
    code = {key: entry.pop(key) for key in ("CODE_FILE", "CODE_FUNC") if key in entry}
    line = int(entry.pop("CODE_LINE")) if "CODE_LINE" in entry else None
    try:
        journal.send(message, MESSAGE_ID=message_id, CODE_LINE=line, **code,
                     **{k: v.encode("utf-8", "surrogateescape") for k, v in entry.items()})
        return True
    except (OSError, ValueError):
        return False


class Reporter:
    """LEAN: write journald's datagram directly (the no-op path); otherwise systemd-python."""

    def __init__(self, target: str = "auto", socket_path: str = JOURNAL_SOCKET, lean: bool = False,
                 sender: Callable[[dict[str, str]], bool] | None = None) -> None:
        self.socket_path = socket_path
        self.to_journal = target in ("auto", "journal") and os.path.exists(socket_path)
        if target == "journal" and not self.to_journal:
            print(f"nvidia-kmod-swap: no journal at {socket_path}; logging to stderr", file=sys.stderr)
        self.also_stderr = not self.to_journal or sys.stderr.isatty()
        self.send = sender or ((lambda f: send_native(f, socket_path)) if lean or socket_path != JOURNAL_SOCKET
                               else send_systemd)

    def event(self, event: str, message: str, priority: str = "info", /,
              origin: tuple[str, int, str] | None = None, **fields: object) -> None:
        """One journal entry. ORIGIN: (file, line, function) where it was decided, when that is
        not the caller (swap.py's outcomes are decided in a procedure, reported in one place)."""
        # Looked up whatever the target, so that an event without an id fails every test, not
        # only the runs that log to a journal.
        message_id, level = MESSAGE_IDS[event], PRIORITY[priority]
        if self.to_journal:
            # CODE_*: where the helper decided what it reports (the caller of event), as journal.send
            # would note its own caller's place.
            if origin is None:
                caller = sys._getframe(1)
                origin = (caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name)
            entry = {"MESSAGE": message, "MESSAGE_ID": message_id, "PRIORITY": str(level),
                     "SYSLOG_IDENTIFIER": "nvidia-kmod-swap", "NVIDIA_EVENT": event,
                     "CODE_FILE": origin[0], "CODE_LINE": str(origin[1]), "CODE_FUNC": origin[2]}
            entry.update({f"NVIDIA_{k.upper()}": _text(v) for k, v in fields.items() if v not in (None, "", (), [])})
            if not self.send(entry):
                self.also_stderr = True
        if self.also_stderr:
            print(f"nvidia-kmod-swap: {message}", file=sys.stderr, flush=True)


def _text(value: object) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(str(v) for v in value)
    return str(value)


# The decisions `status` reads back: what a swap ended in, and what kept it from happening.
OUTCOMES = ("swapped", "rolled-back", "rollback-failed")
DECISIONS = OUTCOMES + ("deferred", "refused", "noop")


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """From journal entries of DECISIONS, newest first: the last swap's outcome (when, from, to,
    result) and, when the newest decisions are deferrals, the pending deferral (since the first
    of them, and the newest reason)."""
    last_swap: dict[str, Any] | None = None
    pending: list[dict[str, Any]] = []
    streak = True
    for entry in entries:
        event = entry.get("NVIDIA_EVENT")
        if streak and event == "deferred":
            pending.append(entry)
        elif event in DECISIONS:
            streak = False
        if last_swap is None and event in OUTCOMES:
            last_swap = entry
        if last_swap is not None and not streak:
            break

    from datetime import datetime

    def when(entry: dict[str, Any]) -> str:
        stamp = entry.get("__REALTIME_TIMESTAMP")  # a datetime (systemd.journal's converters)
        return stamp.isoformat(sep=" ", timespec="seconds") if isinstance(stamp, datetime) else str(stamp or "?")

    result: dict[str, Any] = {"last_swap": None, "pending": None}
    if last_swap is not None:
        result["last_swap"] = {"when": when(last_swap), "result": last_swap.get("NVIDIA_EVENT"),
                               "from": last_swap.get("NVIDIA_PREVIOUS_VERSION") or last_swap.get("NVIDIA_LOADED_VERSION"),
                               "to": last_swap.get("NVIDIA_EXPECTED_VERSION") or last_swap.get("NVIDIA_LOADED_VERSION"),
                               "message": last_swap.get("MESSAGE")}
    if pending:
        result["pending"] = {"since": when(pending[-1]), "why": pending[0].get("NVIDIA_REASON") or pending[0].get("MESSAGE"),
                             "expected_version": pending[0].get("NVIDIA_EXPECTED_VERSION")}
    return result


def read_decisions(limit: int = 500) -> list[dict[str, Any]] | None:
    """This boot's decisions of the helper, newest first (systemd.journal.Reader, matched by
    MESSAGE_ID); None where there is no systemd-python to read the journal with."""
    try:
        from systemd import journal
    except ImportError:
        return None
    reader = journal.Reader()
    try:
        reader.this_boot()
        for event in DECISIONS:
            reader.add_match(MESSAGE_ID=MESSAGE_IDS[event])
        reader.seek_tail()
        entries: list[dict[str, Any]] = []
        while len(entries) < limit:
            entry = reader.get_previous()
            if not entry:
                break
            entries.append(dict(entry))
        return entries
    finally:
        reader.close()
