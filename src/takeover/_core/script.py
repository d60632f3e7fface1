"""The originator's script: where ``__main__.X`` classes come from.

A class defined in a script run as ``python app.py`` pickles as
``__main__.X``, and the recipient's ``__main__`` is another program. So the
originator says where its script came from (:func:`main_reference`): for
``python -m NAME`` the recipient imports NAME; for ``python app.py`` it loads
that file, on first use, as the module ``__takeover_main__``
(:func:`load_main`). Either way the script's ``if __name__ == "__main__"``
block does not run, and ``__main__.X`` resolves there. Objects rebuilt from a
loaded file pickle as ``__takeover_main__.X`` when they move on, with the
same path, so chains A -> B -> C work.

Loading a script runs its top level: whether a reference may be loaded at
all is the policy's call (``UnpicklePolicy.main_refusal``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from .errors import MigrationRefusedError, ProtocolError
from .policy import UnpicklePolicy

MAIN_ALIAS = "__takeover_main__"
"""The module name under which a recipient loads the originator's script."""

MAIN_NAMES = ("__main__", MAIN_ALIAS)
"""The module names that stand for the originator's script in a graph."""


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


def preload_main(reference: str, policy: UnpicklePolicy) -> None:
    """Load the originator's script ahead of a move, if the policy allows it.

    Loading runs the script's top level, which can take milliseconds; done
    before TAKE, it stays out of the service's pause. Any failure is left
    for the move itself to report, with the policy's or the loader's words.
    """
    if policy.main_refusal(reference) is not None:
        return
    try:
        load_main(reference)
    except (MigrationRefusedError, ProtocolError):
        pass


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
    return _load_file(real, path)


def _load_file(real: str, path: str) -> types.ModuleType:
    """Load the script at ``real`` as ``__takeover_main__``, its directory on ``sys.path``."""
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
