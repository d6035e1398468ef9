"""Where system files are: every /proc, /sys, /dev, /run and /etc path goes through a Root, so that
tests and tools can point the helper at a fake tree with --root."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Root(NamedTuple):
    """The prefix of every system path (/proc, /sys, /dev, /run, /etc): / on a machine, a tree in tests."""

    base: Path = Path("/")

    @property
    def is_live(self) -> bool:
        """True when this is the real system, the only case in which the kernel may be changed."""
        return self.base.resolve() == Path("/")

    def __call__(self, path: str | Path) -> Path:
        """The path of an absolute system path inside this root."""
        return self.base / str(path).lstrip("/")
