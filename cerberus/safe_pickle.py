"""Reading pickled numpy data without running code.

A pickle names the callables that rebuild its objects, and loading it calls them: a hostile file
can run anything. CIFAR-10's batch files and the course's unlabeled test file only need numpy
arrays, dtypes, scalars and bytes, so :func:`load` allows exactly those and refuses any other
global with :class:`UnsafePickleError`, before calling it.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

# Everything a pickled dict of numpy arrays needs, and nothing that can run code.
SAFE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1.x (the official files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2.x
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol 2 stores bytes as latin-1 text
        ("collections", "OrderedDict"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to ``name`` (``module.qualname``), which is not allowed."""

    def __init__(self, name: str):
        super().__init__(f"it refers to {name}, which pickled numpy data never needs")
        self.name = name


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafePickleError(f"{module}.{name}")
        return super().find_class(module, name)


def load(file: IO[bytes], encoding: str = "ASCII") -> Any:
    """``pickle.load`` allowing only :data:`SAFE_GLOBALS`; ``encoding`` as pickle's (Python 2 str)."""
    return _NumpyUnpickler(file, encoding=encoding).load()
