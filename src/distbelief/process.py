"""What every role's process function receives from whoever runs it (the launcher, the CLI, a
user's script): a way to report and a way to be told to stop. No role imports the launcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Emit = Callable[[str, object], None]
"""Reports ``(kind, payload)``: "ready", "metric"; the caller routes it."""


class StopFlag(Protocol):
    """A threading.Event or a multiprocessing Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...
