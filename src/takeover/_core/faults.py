"""Fault injection points, for the test suite's fault matrix.

``TAKEOVER_FAULTS`` holds ``point=action`` pairs separated by commas, e.g.
``recipient.adopted=stop``. At a named point the process applies the action
to itself: ``stop`` (SIGSTOP, so a test can see it paused and kill it),
``kill`` (SIGKILL) or ``exit`` (exit status 99 at once). Unset, a checkpoint
costs one dictionary look-up.

The points, in the order of the conversation (tests/test_faults.py covers each):

* originator: ``connected``, ``authenticated``, ``listed``, ``take-received``,
  ``fds-sent-ahead``, ``ahead-ready-received``, ``quiesced``, ``graph-sent``,
  ``fds-sent``, ``committed-received``;
* recipient: ``connected``, ``authenticated``, ``listed``, ``take-sent``,
  ``ahead-received``, ``ahead-ready-sent``, ``graph-received``, ``fds-received``,
  ``adopted``, ``started`` (committed in the arbiter and started, COMMITTED
  not yet sent), ``committed-sent``.

A move across hosts (``crossmove.py``) has its own after ``take-received``:

* originator: ``checked`` (the dry run passed; the listeners not closed to
  new connections yet), ``quiesced``, ``frozen`` (the connections dropped and in repair
  mode), ``graph-sent``, ``ready-received``, ``decided`` (the release hook
  has run: committed), ``commit-sent``;
* recipient: ``take-sent``, ``graph-received``, ``adopted`` (rebuilt in
  repair mode), ``ready-sent``, ``commit-received``, ``started``.
"""

from __future__ import annotations

import os
import signal

_ACTIONS = {"stop", "kill", "exit"}


def _parse(text: str) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        if action not in _ACTIONS:
            raise ValueError(f"TAKEOVER_FAULTS: unknown action {action!r} in {item!r}")
        faults[point] = action
    return faults


_FAULTS = _parse(os.environ.get("TAKEOVER_FAULTS", ""))


def checkpoint(point: str) -> None:
    """Apply the fault configured for ``point``, if any."""
    action = _FAULTS.get(point)
    if action is None:
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        os._exit(99)
