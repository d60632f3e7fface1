"""One user's Python console: what ``code.InteractiveConsole`` does, and moves.

``push(line)`` takes one line of input and returns what the user sees and
whether more input is needed (the ``...`` prompt): a multi-line block is
collected until it is complete, then run; expression results are echoed with
``repr`` (and kept in ``_``); tracebacks are printed; ``print`` output goes to
this console only. Each complete input is compiled under its own filename
(``<alice#2:5>``) and its text kept, so a function defined at the prompt can
be compiled again from source in another interpreter
(:mod:`takeover.demo.portable`).

A console pickles as: its namespace (pickled by :mod:`~takeover.demo.portable`
with the protocol of the surrounding pickle), the inputs' sources, the block
typed so far, the input count and the ``from __future__`` features in force.
"""

from __future__ import annotations
import __future__

import asyncio
import codeop
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .._core.pickling import GraphLoad, needs_load
from . import portable

_FEATURES = {name: getattr(__future__, name) for name in __future__.all_feature_names}


class _Output:
    """Where ``print`` writes while the console runs code."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


class _NoInput:
    """``sys.stdin`` while the console runs code: the server's own is not the user's."""

    def readline(self, size: int = -1) -> str:
        raise EOFError("input() is not available in this shell (no terminal of its own)")

    read = readline

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("no standard input in this shell")


class Logout(Exception):
    """The user ran ``exit()`` or ``quit()``."""


class Console:
    """A namespace of its own, the block typed so far and the inputs' sources.

    Args:
        tag: names this console's inputs in tracebacks (``alice#2``).
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.namespace: dict[str, Any] = {"__name__": "__console__", "__doc__": None}
        self.buffer: list[str] = []
        self.sources: dict[str, str] = {}
        self.count = 0
        self.future: list[str] = []
        self.notify: Callable[[str], None] | None = None
        self._compiler = codeop.CommandCompiler()
        self._out: _Output | None = None
        self._notice_pending = False

    # -- input ------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        return "... " if self.buffer else ">>> "

    def push(self, line: str) -> str:
        """Add one line of input; run the block once it is complete.

        Returns what the user sees (no prompt).

        Raises:
            Logout: the code called ``exit()`` or ``quit()``.
        """
        self.buffer.append(line)
        source = "\n".join(self.buffer)
        filename = f"<{self.tag}:{self.count + 1}>"
        try:
            code = self._compiler(source, filename, "single")
        except (OverflowError, SyntaxError, ValueError):
            self.buffer = []
            self.count += 1
            return self._format_exception(syntax=True)
        if code is None:
            return ""
        self.buffer = []
        self.count += 1
        self.sources[filename] = source
        portable.register_source(filename, source)
        output = self._run(code)
        self._remember_future()
        return output

    def interrupt(self) -> str:
        """Ctrl-C: drop the block typed so far."""
        self.buffer = []
        return "KeyboardInterrupt\n"

    def _run(self, code: Any) -> str:
        out = self._out = _Output()
        saved = sys.stdin, sys.stdout, sys.stderr, sys.displayhook
        sys.stdout = sys.stderr = out
        sys.stdin = _NoInput()
        sys.displayhook = self._display
        try:
            exec(code, self.namespace)
        except SystemExit:
            raise Logout() from None
        except BaseException:
            out.write(self._format_exception(syntax=False))
        finally:
            sys.stdin, sys.stdout, sys.stderr, sys.displayhook = saved
            self._out = None
        return out.getvalue()

    def _display(self, value: object) -> None:
        if value is None:
            return
        self.namespace["_"] = None
        assert self._out is not None
        self._out.write(repr(value) + "\n")
        self.namespace["_"] = value

    def _format_exception(self, *, syntax: bool) -> str:
        kind, value, tb = sys.exc_info()
        assert kind is not None
        if syntax:
            lines = traceback.format_exception_only(kind, value)
        else:
            # Leave out this module's own frame, as code.InteractiveConsole does.
            lines = traceback.format_exception(kind, value, tb.tb_next if tb else None)
        return "".join(lines)

    def _remember_future(self) -> None:
        flags = self._compiler.compiler.flags
        self.future = [n for n, f in _FEATURES.items() if flags & f.compiler_flag]

    # -- migration ----------------------------------------------------------------

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        try:
            blob = portable.dumps(self.namespace, self.sources, int(protocol))
        except pickle.PicklingError as exc:
            self._refused(str(exc))
            raise pickle.PicklingError(f"the console of {self.tag} cannot move: {exc}") from exc
        state = {
            "tag": self.tag,
            "buffer": list(self.buffer),
            "sources": dict(self.sources),
            "count": self.count,
            "future": list(self.future),
            "namespace": blob,
        }
        return (restore, (state,))

    def _refused(self, reason: str) -> None:
        """Tell the user, once, why their session held a move back."""
        if self._notice_pending or self.notify is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._notice_pending = True
        notify = self.notify

        def tell() -> None:
            self._notice_pending = False
            notify(
                "*** The server tried to move to another process, but this session "
                f"holds what cannot move: {reason}. The move was refused and this "
                "session stays here; delete those names to let it move.\n"
            )

        loop.call_soon(tell)


@needs_load
def restore(load: GraphLoad, state: dict[str, Any]) -> Console:
    """Reconstructor: a console rebuilt from its pickled state, within the graph ``load``."""
    console = Console(str(state["tag"]))
    console.sources = dict(state["sources"])
    console.namespace = portable.loads(load, state["namespace"], console.sources)
    console.buffer = [str(line) for line in state["buffer"]]
    console.count = int(state["count"])
    console.future = [str(name) for name in state["future"]]
    for name in console.future:
        feature = _FEATURES.get(name)
        if feature is not None:
            console._compiler.compiler.flags |= feature.compiler_flag
    return console
