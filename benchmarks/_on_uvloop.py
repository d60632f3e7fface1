"""Run an application script on uvloop: ``python benchmarks/_on_uvloop.py SCRIPT [ARGS]``.

load.py's ``--loop uvloop`` serves ``examples/echo.py`` and
``examples/http_counter.py`` unchanged: they call ``asyncio.run``, and with
uvloop's event loop policy installed first, ``asyncio.run`` makes a uvloop
loop (what ``uvloop.run`` does). The script runs as ``__main__`` from its own
path (``runpy.run_path``), so takeover refers a recipient to that file for
its ``__main__`` classes, as when it is run directly.
"""

from __future__ import annotations

import asyncio
import runpy
import sys

import uvloop

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: _on_uvloop.py SCRIPT [ARGS]")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    del sys.argv[0]
    runpy.run_path(sys.argv[0], run_name="__main__")
