"""A restricted unpickler for data files that are pickles (CIFAR's python version).

Unpickling can run any callable a file names, so a tampered dataset file could execute code.
`SafeUnpickler` resolves only the few globals that pickled numpy arrays need and refuses
everything else with a DatasetError; plain containers, numbers and strings need no globals.
Use it as `SafeUnpickler(f, source=path).load()` or through `load_pickle_file(path)`.
"""
from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any, Callable

from bdcore.data.base import DatasetError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); allow
    # exactly that, not arbitrary codecs.
    if encoding.lower() not in _LATIN1:
        raise DatasetError(f"pickle asks for _codecs.encode with codec {encoding!r}; only latin1 is allowed")
    return codecs.encode(text, "latin1", errors)


def _numpy_attr(name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        import numpy

        return getattr(numpy, name)

    return resolve


def _reconstruct() -> Any:
    # numpy >= 2 keeps it in numpy._core; older numpy in numpy.core. Importing numpy.core on
    # numpy 2 only warns, so prefer the private name when it exists.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise DatasetError("numpy's multiarray._reconstruct is not available")


# (module, name) as written in the file -> a resolver. Nothing else can be unpickled.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _numpy_attr("ndarray"),
    ("numpy", "dtype"): _numpy_attr("dtype"),
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that only resolves ALLOWED_GLOBALS (numpy array reconstruction and latin1
    bytes); any other global, e.g. `os.system`, raises DatasetError before anything runs.
    `encoding="bytes"` reads Python 2 str as bytes, as the CIFAR files require."""

    def __init__(self, file, *, source: str | Path | None = None, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self.source = str(source) if source is not None else "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        resolver = ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise DatasetError(
                f"{self.source}: refusing to unpickle global {module}.{name}; this file may be "
                f"tampered with. Only numpy arrays, containers, numbers and strings are accepted."
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self.source}: refusing persistent id {pid!r} in pickle")


def load_pickle_file(path: str | Path) -> Any:
    """Unpickle `path` with SafeUnpickler; any failure is a DatasetError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return SafeUnpickler(f, source=path).load()
    except DatasetError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise DatasetError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc
    except Exception as exc:  # truncated or corrupt pickles raise many different errors
        raise DatasetError(f"{path}: not a valid pickle ({type(exc).__name__}: {exc})") from exc
