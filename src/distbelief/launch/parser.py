"""The argparse parser class of the ``distbelief`` command and its subcommands: how a command
line is refused (which parser speaks, under which usage, naming what). Which flags there are
is ``flags.py``'s business, not this module's.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

MAX_USAGE_LINES = 4
"""A usage longer than this many lines is shortened to one line in errors."""


class CommandParser(argparse.ArgumentParser):
    """Errors say what is wrong under a one-line usage: ``train``'s full usage is 40 lines,
    which buried the one that matters (``--help`` still lists every flag). An unknown flag
    after a command is that command's error (``distbelief ps: error: ...``), as its other
    errors are: argparse leaves those to the top-level parser.

    A flag is taken only as spelled, never by a prefix (``--work`` is not ``--workers``): an
    error then names the flag the user typed, and a flag added later cannot change what a
    command line that worked before means. The subcommands' parsers are of this class too
    (``add_subparsers`` makes them with the class of the parser it is called on).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]  # one signature for argparse's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = subcommands(self).get(getattr(parsed, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def parse_known_args(  # type: ignore[override]  # one signature for argparse's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = _negative_values_attached(self, list(sys.argv[1:] if args is None else args))
        # An unknown flag is named before argparse checks the rest: otherwise `ps --shard 0`
        # is refused for its missing --shard-id, not for the --shard the user meant by it.
        if not subcommands(self):
            unknown = [arg for arg in _long_flags(args) if not self._knows(arg)]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)

    def _knows(self, flag: str) -> bool:
        return flag.split("=", 1)[0] in self._option_string_actions

    def format_usage(self) -> str:
        usage = super().format_usage()
        if usage.count("\n") <= MAX_USAGE_LINES:
            return usage
        return f"usage: {self.prog} [options] (all of them: {self.prog} --help)\n"


_NEGATIVE_VALUE = re.compile(r"-\.?\d")
"""The start of a value argparse takes for a flag (``-0.1,0.9``, ``-1e-3``): no flag starts so."""


def _negative_values_attached(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``--flag -0.1,0.9`` as ``--flag=-0.1,0.9`` for a flag of one value: argparse reads a word
    that starts with ``-`` and is not a plain negative number as a flag, and said ``expected one
    argument`` of a flag the user had given one (``--server-betas -0.1,0.9``), instead of
    checking the value."""
    # This parser's own flags: a subcommand's parser attaches its own values (argparse hands
    # it every word after the subcommand), and a flag of another command stays as typed for
    # the error that names it.
    takes_one = {
        option
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    }
    end = args.index("--") if "--" in args else len(args)
    attached: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        following = args[index + 1] if index + 1 < end else ""
        if index < end and word in takes_one and _NEGATIVE_VALUE.match(following):
            attached.append(f"{word}={following}")
            index += 2
            continue
        attached.append(word)
        index += 1
    return attached


def _long_flags(args: Sequence[str]) -> list[str]:
    """The words of ``args`` argparse reads as long flags: those before a lone ``--`` that
    start with ``--`` and hold no space (argparse reads a word with a space as a value)."""
    words = list(args)
    end = words.index("--") if "--" in words else len(words)
    return [word for word in words[:end] if word.startswith("--") and " " not in word]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parsers of ``parser``'s subcommands, by name (none for a subcommand's own)."""
    return next(
        (
            action.choices
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
        ),
        {},
    )
