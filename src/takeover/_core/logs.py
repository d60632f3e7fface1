"""One line per move, on both sides, readable without the docs; JSON on request.

Every move is logged once by the originator and once by the recipient, on
the ``takeover.moves`` logger: INFO when it committed, WARNING when it did
not, with the service, its connections, the pause and the other process's
pid, or the reason it failed::

    moved 'echo' to pid 4242: 50 connections, paused 1.31 ms
    took 'echo' from pid 4100: 50 connections, paused 1.31 ms, 51 fds
    did not move 'echo' to pid 4242 (it goes on here): the recipient ...

Each record also carries the same facts as data (``record.move``), which
the JSON format writes as fields. takeover does not configure logging for
an application that does; for one that does not, :func:`ensure_move_log`
(called by ``serve_until_moved`` and ``take_and_serve``) sends these lines to
stderr, which under systemd is the journal.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

MOVES = logging.getLogger("takeover.moves")

TEXT_FORMAT = "takeover[%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, and a move's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        move = getattr(record, "move", None)
        if isinstance(move, dict):
            data.update(move)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, sort_keys=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``log_format`` ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}: choose text or json")


class _Without(logging.Filter):
    """Drops the move records of some events (a command that reports them itself)."""

    def __init__(self, events: tuple[str, ...]) -> None:
        super().__init__()
        self.events = events

    def filter(self, record: logging.LogRecord) -> bool:
        move = getattr(record, "move", None)
        return not (isinstance(move, dict) and move.get("event") in self.events)


def configure(
    log_format: str = "text", level: int = logging.WARNING, without: tuple[str, ...] = ()
) -> None:
    """Log to stderr in ``log_format``: ``level`` for everything, INFO for the moves.

    What the command line does; an application may call it too. ``without``:
    events whose move lines are not logged (``takeover take`` prints its own
    line for "took" and "not-taken").
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    if without:
        handler.addFilter(_Without(without))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if MOVES.getEffectiveLevel() > logging.INFO:
        MOVES.setLevel(logging.INFO)


def ensure_move_log(log_format: str | None = None) -> None:
    """Make the move lines reach stderr if the application configured no logging.

    With ``log_format`` given, configure logging that way (see :func:`configure`).
    """
    if log_format is not None:
        configure(log_format)
        return
    if logging.getLogger().handlers or logging.getLogger("takeover").handlers:
        return
    configure("text")


def move_event(event: str, service: str, **facts: Any) -> dict[str, Any]:
    """The ``move`` of a record (``extra={"move": ...}``)."""
    return {"event": event, "service": service, **facts}
