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


# numpy's reduce functions are taken from arrays rather than imported by name: numpy 2 moved
# them (numpy.core -> numpy._core), and a pickle names them where its writer's numpy had them.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_FROM_BUFFER = np.zeros(1, dtype=np.uint8).__reduce_ex__(5)[0]

PLAIN_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROM_BUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROM_BUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}
"""(module, name) -> the object a pickle may use: numpy arrays (protocols 0-5, numpy 1 and 2)
and Python 3's bytes under protocols 0-2 (``bytes()`` for empty ones, hence its Python 2 name).
Dicts, lists, strings and numbers need no global."""


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
