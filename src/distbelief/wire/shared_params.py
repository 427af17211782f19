"""Shared parameters: a shard's parameter slices in memory that clients on its host map and
copy from directly, so that a pull's bytes cross no socket and no ring; and, the other way, a
client's push buffers that the shard maps and applies from.

The shard moves its slices into one anonymous memory file (``memfd``: nothing is named in
/dev/shm, and nothing is left behind when the shard dies, however it dies). A client the
shard offers it to (over an authenticated connection; the SHARE op) opens it read-only through
``/proc/<pid>/fd/<fd>``, checks the random token in its header, and copies the slices under a
sequence lock: the shard makes the header's counter odd before it changes the parameters and
even after, with the new version; a reader that saw the counter odd, or changed, copies again,
and after a few tries leaves the read to an ordinary pull, which takes the shard's lock.

A client's outbox (or push buffers it copies a gradient into) is a file of the same form, which
it offers with each push (the PLACED_KEY of its metadata); the shard maps it (once per
connection and place) and applies the gradient from it before it answers, and the client
writes the next gradient there only after the answer.

Only on x86-64, whose stores are seen in the order they were made: the counter and version
are single 8-byte stores, and no fence can be written from here for weaker memory models.
Elsewhere, or where a peer cannot open the file (another user, another PID namespace), pulls
stay requests.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import secrets
import select
import stat
import threading
import time
import warnings
from collections.abc import Sequence

import torch

from distbelief.wire.dtypes import dtype_from_name, dtype_name

DIRECT_READS_KEY = "reads"
"""A push's count of its client's reads of the shared parameters since its last push (the
shard counts them as pulls)."""
PLACED_KEY = "placed"
"""A push whose gradient lies in the client's shared memory (its outbox, or push buffers it
copied the gradient into): where, as an offer (no tensors travel)."""
HEADER_BYTES = 64
_SEQ, _VERSION, _RETIRED, _TOKEN = range(4)
"""The header's int64 fields: the sequence counter, the version of the values, 1 once the
shard stopped updating this memory (a new store, or closed), the token."""
_ALIGN = 64
READ_TRIES = 8
"""Copies a reader makes before leaving the read to a pull (the shard kept writing)."""
BUSY_PAUSE_S = 0.0002
"""A reader's pause after finding the shard mid-update (an update of a 4 MB slice takes
~0.1-0.4 ms here)."""
_MEMFD_PREFIX = "distbelief-"
_WRITE_ORDERED_MACHINES = frozenset({"x86_64", "amd64", "AMD64", "i386", "i686"})


def supported() -> str | None:
    """None if this process can share parameters, else why not."""
    if platform.machine() not in _WRITE_ORDERED_MACHINES:
        return f"shared parameter reads need x86-64 memory ordering, not {platform.machine()}"
    if not hasattr(os, "memfd_create") or not hasattr(os, "pidfd_open"):
        return "this system has no memfd_create or pidfd_open"
    return None


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _header(mapping: mmap.mmap) -> memoryview:
    """The header's int64 fields. A memoryview, not a tensor: a field read or written costs
    ~0.1 us instead of a tensor index's ~5 us, and every pull and push touches it a few times
    (read-only for a reader's read-only mapping)."""
    return memoryview(mapping)[:HEADER_BYTES].cast("q")


def _views(mapping: mmap.mmap, layout: Sequence[tuple[int, int, torch.dtype]]) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [
            torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset)
            if numel
            else torch.empty(0, dtype=dtype)
            for offset, numel, dtype in layout
        ]


class SharedTensors:
    """Tensors moved into a memory file that other processes of this host can map: a shard's
    parameters, or a client's push buffers.

    Made from the tensors and their version: it copies each into the file and points the
    tensor at it (``Tensor.set_``: the same tensor objects, so an optimizer holding them is
    unaffected). Every change of a shard's parameters from then on happens between
    :meth:`begin_write` and :meth:`end_write`.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], version: int = 0, *, name: str = "params"
    ) -> None:
        layout, offset = [], HEADER_BYTES
        for param in params:
            layout.append((offset, param.numel(), param.dtype))
            offset = _aligned(offset + param.numel() * param.dtype.itemsize)
        self.size = offset
        # The name only shows in /proc/PID/maps: what the memory is, for whoever looks.
        self.fd = os.memfd_create(f"{_MEMFD_PREFIX}{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            # Reserves the pages now: out of memory fails here, not with SIGBUS on a write.
            os.posix_fallocate(self.fd, 0, self.size)
            self._mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.layout = layout
        self._retiring = threading.Lock()
        self.token = secrets.randbits(62)
        # Where the file's bytes start in this process: offer_of measures offsets from it.
        self._base_address = _views(self._mapping, [(0, 1, torch.uint8)])[0].data_ptr()
        self._header = _header(self._mapping)
        self._header[_TOKEN] = self.token
        self._header[_VERSION] = version
        self.tensors = list(params)
        """The tensors, now in the file."""
        for param, view in zip(params, _views(self._mapping, layout), strict=True):
            if param.numel():
                view.copy_(param.detach().reshape(-1))
                with torch.no_grad():
                    param.set_(view.view(param.shape))

    def offer(self) -> dict:
        """What another process needs to map this file (a SHARE reply's fields)."""
        return self._offer([[o, numel, dtype_name(dtype)] for o, numel, dtype in self.layout])

    def offer_of(self, tensors: Sequence[torch.Tensor]) -> dict | None:
        """The offer of ``tensors`` (contiguous views of this file's tensors), to map them
        where they lie; None if any lies elsewhere."""
        base, slices = self._base_address, []
        for tensor in tensors:
            offset = tensor.data_ptr() - base
            if not tensor.numel():
                offset = HEADER_BYTES  # an empty slice lies anywhere
            elif not tensor.is_contiguous() or not HEADER_BYTES <= offset <= self.size - (
                tensor.numel() * tensor.dtype.itemsize
            ):
                return None
            slices.append([offset, tensor.numel(), dtype_name(tensor.dtype)])
        return self._offer(slices)

    def _offer(self, slices: list) -> dict:
        return {
            "pid": os.getpid(),
            "fd": self.fd,
            "token": self.token,
            "size": self.size,
            "slices": slices,
        }

    def begin_write(self) -> None:
        self._header[_SEQ] += 1

    def end_write(self, version: int) -> None:
        header = self._header
        header[_VERSION] = version
        header[_SEQ] += 1

    def retire(self) -> None:
        """The parameters live elsewhere from now on: readers stop using this file, and no
        new one can open it (the pages go once every mapping is let go). Once only, from any
        thread: a client closing while its lane releases the same buffers closes the file
        once, never a descriptor number reused since."""
        with self._retiring:
            if self.fd < 0:
                return
            self._header[_RETIRED] = 1
            self._header[_SEQ] += 2
            os.close(self.fd)
            self.fd = -1


_MAX_PID = 2**31 - 1
"""The largest process id or descriptor number an offer may name: the kernel's are C ints."""


def _map_offer(offer: dict, slices, *, writable: bool) -> tuple[mmap.mmap, list, int]:
    """Map the file ``offer`` describes: (mapping, a view per slice, a pidfd of its owner).

    Raises:
        ValueError: the offer is malformed, does not fit ``slices`` ((numel, dtype) each), or
            the file opened is not the one offered.
        OSError: the file cannot be opened from here (the owner has ended, or is another
            user's, or in another PID namespace).
    """
    try:
        pid, fd, token, size = (int(offer[key]) for key in ("pid", "fd", "token", "size"))
        layout = [(int(o), int(n), dtype_from_name(d)) for o, n, d in offer["slices"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed shared-memory offer: {e}") from None
    if not 0 < pid <= _MAX_PID or not 0 <= fd <= _MAX_PID:
        # The kernel's calls take C ints: a larger number is no process or descriptor.
        raise ValueError(f"malformed shared-memory offer: pid {pid}, fd {fd}")
    if [(numel, dtype) for _, numel, dtype in layout] != list(slices):
        raise ValueError("the shared tensors do not fit these slices")
    if any(o < HEADER_BYTES or o + n * d.itemsize > size for o, n, d in layout):
        raise ValueError("the shared tensors lie outside the file")
    pidfd = os.pidfd_open(pid)
    try:
        # Only a memory file of ours in a process of this user: an offer cannot point this
        # process at any other file it may open.
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            raise ValueError("the offered file belongs to another user's process")
        if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:{_MEMFD_PREFIX}"):
            raise ValueError("the offered file is not the one offered")
        flags = os.O_RDWR if writable else os.O_RDONLY
        file_fd = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)
        try:
            info = os.fstat(file_fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise ValueError("the offered file is not the one offered")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(file_fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(file_fd)
        header = _header(mapping)
        found = header[_TOKEN]
        header.release()
        if found != token:
            mapping.close()
            raise ValueError("the offered file is not the one offered")
        return mapping, _views(mapping, layout), pidfd
    except BaseException:
        os.close(pidfd)
        raise


def map_push_buffers(offer: dict, slices) -> list[torch.Tensor]:
    """The shard's side of a client's push buffers: writable views of each slice (a policy
    may adjust a gradient in place); the mapping lasts as long as they do."""
    _mapping, views, pidfd = _map_offer(offer, slices, writable=True)
    os.close(pidfd)
    return views


class SharedParamsReader:
    """A client's read-only view of one shard's shared parameters.

    Raises from :meth:`open`: OSError (the file cannot be opened from here) or ValueError (it
    is not the one offered, or does not fit the client's slices).
    """

    def __init__(self, mapping: mmap.mmap, views: list, pidfd: int) -> None:
        self._mapping = mapping
        self._header = _header(mapping)
        self._views = views
        self._pidfd = pidfd
        self._closing = threading.Lock()
        self._gone = select.poll()
        self._gone.register(pidfd, select.POLLIN)

    @classmethod
    def open(cls, offer: dict, slices: Sequence[tuple[int, torch.dtype]]) -> SharedParamsReader:
        """Map the file ``offer`` (a SHARE reply) describes; ``slices``: (numel, dtype) of each
        slice, as the client expects them. Raises as ``_map_offer``."""
        return cls(*_map_offer(offer, slices, writable=False))

    @property
    def usable(self) -> bool:
        """False once the shard has ended or stopped updating this memory."""
        return self._pidfd >= 0 and not self._gone.poll(0) and not self._header[_RETIRED]

    def read_into(self, outs: Sequence[torch.Tensor]) -> int | None:
        """Copy a consistent snapshot of the slices into ``outs``; its version, or None when
        the shard kept writing, has ended, or moved its parameters (pull instead)."""
        header, views = self._header, self._views
        for attempt in range(READ_TRIES):
            if not self.usable:
                return None
            before = header[_SEQ]
            if before % 2 == 0:
                version = header[_VERSION]
                torch._foreach_copy_(list(outs), views)
                if header[_SEQ] == before:
                    return version
            if attempt + 1 < READ_TRIES:
                time.sleep(BUSY_PAUSE_S)
        return None

    def close(self) -> None:
        """Let the file go. Once only, from any thread: a client closing while its lane drops
        the same reader (the shard ended) closes the shard's process handle once, never a
        descriptor number reused since."""
        with self._closing:
            if self._pidfd < 0:
                return
            os.close(self._pidfd)
            self._pidfd = -1
            self._views = []
            self._header.release()
            with contextlib.suppress(BufferError):
                self._mapping.close()
