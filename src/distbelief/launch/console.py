"""The ``distbelief`` command's entry point (``python -m distbelief`` too). It imports the
command line only once it can take Ctrl-C: a Ctrl-C while the command loads or reads its flags,
before the command's own handling is in place, ends it as one later does (one line, exit 130),
not with a ``KeyboardInterrupt`` traceback; and a SIGINT sent by pid to a command that a shell
started in the background (SIGINT ignored) is not lost in that time either."""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    # As the command does once it runs (cli.run): a SIGINT by pid stops it, as Ctrl-C does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from distbelief.launch.cli import main as run_command

        return run_command()
    except KeyboardInterrupt:
        print("distbelief: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
