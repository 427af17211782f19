"""Unpickling data files that must hold plain data only (the CIFAR-10 python batches).

A pickle may build dicts, lists, tuples, strings, bytes, numbers and numpy arrays; any other
global it names is refused before it is called, so a crafted file cannot run code while it is
read. Knows nothing about what the data means: the loaders check that.
"""

from __future__ import annotations

import pickle
from typing import BinaryIO

import numpy as np


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes under protocols 0-2, and nothing more: other
    codecs (compression among them) are not how bytes are stored."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode of {encoding!r} is not plain data")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as Python 3 pickles an empty bytes object under protocols 0-2. With an
    argument, bytes(n) would allocate whatever size the file names, though it holds no data."""
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not how bytes are stored")
    return b""


def _ndarray_class(*args: object) -> None:
    """What the name numpy.ndarray unpickles to: only the class argument of ``_reconstruct``.
    Called, ndarray(shape) would allocate an array of a size the file declares but does not
    hold (gigabytes from a few bytes)."""
    raise pickle.UnpicklingError("numpy.ndarray called directly is not how arrays are stored")


# numpy's reduce functions are taken from arrays rather than imported by name: numpy 2 moved
# them (numpy.core -> numpy._core), and a pickle names them where its writer's numpy had them.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_FROM_BUFFER = np.zeros(1, dtype=np.uint8).__reduce_ex__(5)[0]


def _reconstruct_empty(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct``, which numpy's pickles always call with shape (0,): the array's
    real shape comes with its bytes in the state set next, and numpy checks that the two agree.
    Another shape would allocate memory the file does not fill."""
    if subtype is not _ndarray_class:
        raise pickle.UnpicklingError("_reconstruct of anything but numpy.ndarray is not plain data")
    if shape != (0,):
        raise pickle.UnpicklingError(f"_reconstruct of shape {shape!r}: not how arrays are stored")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


PLAIN_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy.core.numeric", "_frombuffer"): _FROM_BUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROM_BUFFER,
    ("numpy", "ndarray"): _ndarray_class,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
"""(module, name) -> the object a pickle may use: numpy arrays (protocols 0-5, numpy 1 and 2)
and Python 3's bytes under protocols 0-2 (``bytes()`` for empty ones, hence its Python 2 name).
Dicts, lists, strings and numbers need no global. Nothing here allocates more than the file's
own bytes: an array's size is checked against the data the file holds."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        # Every way a pickle reaches a global (GLOBAL, STACK_GLOBAL, EXT*) comes through here.
        try:
            return PLAIN_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which is not plain data (dicts, lists, bytes, "
                "numbers and numpy arrays only)"
            ) from None


def load_plain_pickle(file: BinaryIO, *, encoding: str = "ASCII") -> object:
    """Unpickles ``file`` if it builds plain data only (see ``PLAIN_GLOBALS``).

    Args:
        file: The pickle, opened for binary reading.
        encoding: How Python 2 strings are decoded ("bytes" keeps them as bytes).

    Raises:
        pickle.UnpicklingError: The pickle names a global that is not plain data (nothing it
            names is called), or is malformed. A corrupt pickle can fail with other errors too
            (EOFError, ValueError, TypeError, ...): the caller names the file.
    """
    return _PlainUnpickler(file, encoding=encoding).load()
