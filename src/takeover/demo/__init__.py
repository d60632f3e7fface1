"""The paper's demonstration: a telnet Python shell moved mid-session.

``takeover demo`` tells the whole story by itself (:mod:`.story`);
``takeover demo serve`` runs only the server (:mod:`.shell`), for you to log
in with ``telnet`` and move with ``takeover take``.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """``takeover demo [serve ...]``."""
    rest = list(getattr(args, "demo_args", None) or [])
    if rest and rest[0] == "serve":
        from .shell import main

        return main(rest[1:])
    if rest:
        raise SystemExit(f"takeover demo: unknown arguments {' '.join(rest)!r} (try `serve`)")
    from .story import run as story

    return story()
