"""The one interface every report of a run goes through: a ``Sink`` takes metrics records and
one-off messages. ``FanOut`` hands each to several sinks, so the launcher routes to one."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

_Closing = TypeVar("_Closing", bound="ClosedOnExit")


@runtime_checkable
class Sink(Protocol):
    """Where a run's reports go: the CSV, TensorBoard, the terminal, a test's list."""

    def write(self, record: dict) -> None:
        """Takes one metrics record (as made by ``make_record``)."""

    def message(self, text: str, time_s: float | None = None) -> None:
        """Takes a one-off line such as "worker1 died"; sinks of records only may ignore it.
        ``time_s``: when it happened, on the records' clock (a fault's time), if known; None:
        now, as far as the records tell (the latest record's time)."""

    def close(self) -> None:
        """Flushes and releases what the sink holds; closing twice is harmless."""


class ClosedOnExit(abc.ABC):
    """Base of the sinks: ``with sink:`` closes it on the way out, whatever happened."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases what the sink holds."""

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FanOut(ClosedOnExit):
    """A ``Sink`` that hands every record and message to each of ``sinks``, in order, and closes
    them all (in reverse order) when closed; use as a context manager."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        """Passes ``record`` to every sink."""
        for sink in self.sinks:
            sink.write(record)

    def message(self, text: str, time_s: float | None = None) -> None:
        """Passes ``text`` (and when it happened) to every sink."""
        for sink in self.sinks:
            sink.message(text, time_s)

    def close(self) -> None:
        """Closes every sink, even when one of them raises (the first error is re-raised)."""
        error: BaseException | None = None
        for sink in reversed(self.sinks):
            try:
                sink.close()
            except BaseException as e:  # the other sinks still hold files to flush
                error = error or e
        if error is not None:
            raise error
