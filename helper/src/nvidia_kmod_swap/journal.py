"""Reporting: structured journal entries (systemd-python) with a plain stderr fallback.

Each event has a fixed MESSAGE_ID so that `journalctl MESSAGE_ID=...` finds it; docs/helper.md
lists them. Fields carry versions, modules and holders; MESSAGE says the same for a human.
"""

from __future__ import annotations

import os
import sys

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
}
PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "err": 3, "crit": 2}


class Reporter:
    def __init__(self, target: str = "auto") -> None:
        self.send = None
        if target in ("auto", "journal"):
            self.send = self._journal_sender(required=target == "journal")
        self.also_stderr = self.send is None or sys.stderr.isatty()

    @staticmethod
    def _journal_sender(required: bool):
        if not required and not os.path.exists("/run/systemd/journal/socket"):
            return None
        try:
            from systemd import journal  # lazy: the no-op path should not pay for it without a journal
        except ImportError:
            if required:
                print("nvidia-kmod-swap: systemd-python is not available; logging to stderr", file=sys.stderr)
            return None
        return journal.send

    def event(self, event: str, message: str, priority: str = "info", **fields: object) -> None:
        if self.send is not None:
            extra = {f"NVIDIA_{k.upper()}": _text(v) for k, v in fields.items() if v not in (None, "", (), [])}
            try:
                self.send(message, MESSAGE_ID=MESSAGE_IDS[event], PRIORITY=str(PRIORITY[priority]),
                          SYSLOG_IDENTIFIER="nvidia-kmod-swap", NVIDIA_EVENT=event, **extra)
            except OSError:
                self.also_stderr = True
        if self.also_stderr:
            print(f"nvidia-kmod-swap: {message}", file=sys.stderr, flush=True)


def _text(value: object) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(str(v) for v in value)
    return str(value)
