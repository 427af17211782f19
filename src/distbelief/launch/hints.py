"""How the launcher writes a path into a command it tells the user to run: as a shell word,
so that a path with a space or a quote in it can be copied into the shell as it is printed."""

from __future__ import annotations

import shlex
from pathlib import Path


def shell_word(path: str | Path) -> str:
    """``path`` as one word of a shell command: as it is where the shell would read it so,
    quoted where it holds a space, a quote or another character the shell would take."""
    return shlex.quote(str(path))
