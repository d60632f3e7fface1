"""The only module that pickles or unpickles.

A service graph is pickled in one pass. Two kinds of object get special
treatment:

* **sockets** become persistent ids, ``("socket", slot, family, type,
  proto)``: their descriptors are collected in slot order and travel beside
  the pickle over SCM_RIGHTS; the recipient rebuilds each socket around the
  descriptor in its slot. The kernel object is never copied, so kernel
  buffers and connection state are untouched.
* **modules** travel by name and are imported again on the other side.

Classes defined in a script run as ``python app.py`` pickle as
``__main__.X``, and the recipient's ``__main__`` is another program. The graph
says where the script came from (``main_reference``): for ``python -m NAME``
the recipient imports NAME; for ``python app.py`` it loads that file, on
first use, as the module ``__takeover_main__``. Either way the script's ``if
__name__ == "__main__"`` block does not run, and ``__main__.X`` resolves
there. Objects rebuilt from a loaded file pickle as ``__takeover_main__.X``
when they move on, with the same path, so chains A -> B -> C work.

Where the recipient can't rebuild something (a class it can't import, a
descriptor missing) the error names it and every descriptor received is
closed, so that the originator can roll back with nothing leaked here.
"""

from __future__ import annotations

import copyreg
import importlib
import importlib.util
import io
import os
import pickle
import socket
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from ._errors import MigrationRefusedError, ProtocolError, SerializationError
from ._fds import close_all

MAIN_ALIAS = "__takeover_main__"
"""The module name under which a recipient loads the originator's script."""

_MAIN_NAMES = ("__main__", MAIN_ALIAS)


def _import_module(name: str) -> types.ModuleType:
    """Rebuild a module reference (the only constructor modules pickle to)."""
    if name in _MAIN_NAMES:
        module = _current_main()
        if module is None:
            raise MigrationRefusedError(
                f"the graph refers to the originator's script module {name!r}, "
                "but the originator sent no script path"
            )
        return module
    return importlib.import_module(name)


def _reduce_module(module: types.ModuleType) -> tuple[Callable[..., Any], tuple[str]]:
    return (_import_module, (module.__name__,))


def main_reference() -> str | None:
    """Where this process's script classes (``__main__.X``) come from.

    ``module:NAME`` when the script was run as ``python -m NAME`` (the
    recipient imports NAME), ``path:/abs/app.py`` when it was run as a file
    (the recipient loads that file), None when there is no such script.
    """
    alias_path = getattr(sys.modules.get(MAIN_ALIAS), "__file__", None)
    if isinstance(alias_path, str):
        return f"path:{os.path.abspath(alias_path)}"
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) and spec.name != "__main__":
        return f"module:{spec.name}"
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path.endswith(".py"):
        return f"path:{os.path.abspath(path)}"
    return None


@dataclass
class Dumped:
    """A pickled graph and the sockets whose descriptors travel with it."""

    blob: bytes
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self.sockets]


class _GraphPickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, types.ModuleType: _reduce_module}

    def __init__(self, file: io.BytesIO, protocol: int) -> None:
        super().__init__(file, protocol)
        self.sockets: list[socket.socket] = []
        self._slots: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, socket.socket):
            if obj.fileno() < 0:
                raise SerializationError(f"cannot migrate closed socket {obj!r}")
            ssl = sys.modules.get("ssl")
            if ssl is not None and isinstance(obj, ssl.SSLSocket):
                # Its TLS session lives in this process's memory; the fd alone
                # would give the recipient a stream of ciphertext.
                raise SerializationError(
                    f"cannot migrate TLS socket {obj!r}: TLS sessions cannot move yet"
                )
            slot = self._slots.get(id(obj))
            if slot is None:
                slot = self._slots[id(obj)] = len(self.sockets)
                self.sockets.append(obj)
            return ("socket", slot, int(obj.family), int(obj.type), obj.proto)
        return None


def dumps(graph: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Dumped:
    """Pickle ``graph``; sockets in it become descriptor slots.

    Raises:
        SerializationError: something in the graph cannot be pickled.
    """
    buffer = io.BytesIO()
    pickler = _GraphPickler(buffer, protocol)
    try:
        pickler.dump(graph)
    except SerializationError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
        raise SerializationError(f"the service graph cannot be pickled: {exc}") from exc
    return Dumped(buffer.getvalue(), pickler.sockets)


# The script module the current load resolves __main__ against.
_main_state: dict[str, str | None] = {"reference": None}


def _current_main() -> types.ModuleType | None:
    reference = _main_state["reference"]
    if reference is None:
        return None
    return load_main(reference)


def load_main(reference: str) -> types.ModuleType:
    """The module that the originator's ``__main__`` classes resolve to here.

    ``module:NAME`` is imported by name (its ``__main__`` block does not run,
    since it is not ``__main__`` here). ``path:FILE`` is loaded once as
    ``__takeover_main__``; if this process's own ``__main__`` is that same
    file, it is used as is.
    """
    kind, _, path = reference.partition(":")
    if kind == "module":
        try:
            return importlib.import_module(path)
        except Exception as exc:
            raise MigrationRefusedError(
                f"cannot import the originator's main module {path}: {type(exc).__name__}: {exc}"
            ) from exc
    if kind != "path" or not path:
        raise ProtocolError(f"malformed main script reference {reference!r}")
    real = os.path.realpath(path)
    for name in (MAIN_ALIAS, "__main__"):
        module = sys.modules.get(name)
        existing = getattr(module, "__file__", None)
        if module is not None and existing and os.path.realpath(existing) == real:
            return module
    if MAIN_ALIAS in sys.modules:
        raise MigrationRefusedError(
            f"this process already loaded {sys.modules[MAIN_ALIAS].__file__} as the "
            f"originator's script and cannot load a second one ({path}); take services "
            "from different scripts in different recipients"
        )
    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, real)
    if spec is None or spec.loader is None:
        raise MigrationRefusedError(f"cannot load the originator's script {path}")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(real)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[MAIN_ALIAS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[MAIN_ALIAS]
        raise MigrationRefusedError(
            f"loading the originator's script {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


class _GraphUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: Sequence[int]) -> None:
        super().__init__(file)
        self.fds = list(fds)
        self.sockets: dict[int, socket.socket] = {}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "socket"):
            raise ProtocolError(f"unknown persistent reference {pid!r} in the graph")
        _, slot, family, kind, proto = pid
        if not isinstance(slot, int) or not 0 <= slot < len(self.fds):
            raise ProtocolError(
                f"the graph refers to descriptor slot {slot!r}, only {len(self.fds)} arrived"
            )
        sock = self.sockets.get(slot)
        if sock is None:
            sock = socket.socket(family, kind, proto, fileno=self.fds[slot])
            self.sockets[slot] = sock
        return sock

    def find_class(self, module: str, name: str) -> Any:
        # The allowlist of issue "safe unpickling" hooks in here.
        try:
            if module in _MAIN_NAMES:
                target: Any = _current_main()
                if target is None:
                    raise MigrationRefusedError(
                        "the originator did not say where its __main__ classes come from"
                    )
                for part in name.split("."):
                    target = getattr(target, part)
                return target
            return super().find_class(module, name)
        except MigrationRefusedError:
            raise
        except (ImportError, AttributeError) as exc:
            raise MigrationRefusedError(
                f"cannot import {module}.{name}: {type(exc).__name__}: {exc}"
            ) from exc


def loads(blob: bytes, fds: Sequence[int], *, main: str | None = None) -> Any:
    """Rebuild a graph from ``blob`` and the descriptors that came with it.

    On success every descriptor belongs to a socket in the graph, or is
    closed if the graph did not use it. On failure all are closed.

    Raises:
        MigrationRefusedError: the graph cannot be rebuilt here; the message
            names the class or module at fault.
        ProtocolError: the blob or its descriptor references are malformed.
    """
    unpickler = _GraphUnpickler(io.BytesIO(blob), fds)
    previous = _main_state["reference"]
    _main_state["reference"] = main
    try:
        graph = unpickler.load()
    except BaseException as exc:
        for sock in unpickler.sockets.values():
            sock.close()
        used = {s for s in unpickler.sockets}
        close_all([fd for slot, fd in enumerate(fds) if slot not in used])
        if isinstance(exc, (MigrationRefusedError, ProtocolError)):
            raise
        if isinstance(exc, Exception):
            raise MigrationRefusedError(
                f"cannot rebuild the service graph: {type(exc).__name__}: {exc}"
            ) from exc
        raise
    finally:
        _main_state["reference"] = previous
    close_all([fd for slot, fd in enumerate(fds) if slot not in unpickler.sockets])
    return graph
