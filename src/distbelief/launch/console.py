"""The ``distbelief`` command's entry point (``python -m distbelief`` too). It imports the
command line only once it can take Ctrl-C and SIGTERM: either, while the command loads or reads
its flags, before the command's own handling is in place, ends it as one later does (one line,
exit 130), not with a ``KeyboardInterrupt`` traceback or SIGTERM's silent exit 143; and a
SIGINT sent by pid to a command that a shell started in the background (SIGINT ignored) is not
lost in that time either."""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: ``ps`` saves its checkpoint on the way out, a worker
    closes its connections, every ``finally`` runs (the default action would end the process
    where it stands)."""


def raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def stop_on_hang_up() -> object:
    """A hang-up (the terminal or ssh session of a hand-started shard closing) stops the
    command as SIGTERM does, where its default action ended it on the spot: a shard then saved
    no last checkpoint. Left ignored under ``nohup``, which asks for that. Returns the handler
    it replaces."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return signal.SIG_IGN
    return signal.signal(signal.SIGHUP, raise_terminated)


def main() -> int:
    # As the command does once it runs (cli.run): a SIGINT by pid stops it, as Ctrl-C does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)
    stop_on_hang_up()
    try:
        from distbelief.launch.cli import main as run_command

        code = run_command()
    except KeyboardInterrupt as e:
        print(f"distbelief: {e if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    leave_undisturbed()
    return code


def leave_undisturbed() -> None:
    """The command has its exit code; what is left is the interpreter's exit (unloading torch
    takes a while), in which Python gives SIGINT its default action back: a second Ctrl-C
    there ended the process by the signal (a parent saw a death by SIGINT, not exit 130), and
    a SIGTERM with 143, where there was nothing left to stop. They are ignored from here."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
