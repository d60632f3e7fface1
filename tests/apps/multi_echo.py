"""Line echo services "a" and (optionally) "b", for the end-to-end tests.

    python tests/apps/multi_echo.py --port 8007 --control /tmp/c.sock
    python tests/apps/multi_echo.py --port 8007 --port-b 8008 --control /tmp/c.sock \
        --protocol-b some_module:SomeProtocol
    python tests/apps/multi_echo.py --port 8007 --control /tmp/c.sock --loop uvloop

Each service's protocol is this file's ``Echo`` unless ``--protocol`` (for
"a") or ``--protocol-b`` names a class ``MODULE:CLASS`` to import instead, so
that a test can make a service whose class only this process can import.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from typing import Any

# The repository's root, for harness/; a recipient that loads this script runs this too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import takeover.asyncio as takeover
from harness import echo


class Echo(echo.Echo):
    """The line echo (harness/echo.py), as a class of this script: a recipient allows it."""


def protocol_class(spec: str | None) -> Any:
    """``Echo``, or the class that ``MODULE:CLASS`` names."""
    if not spec:
        return Echo
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


async def main(args: argparse.Namespace) -> None:
    services = [
        await takeover.start_server(protocol_class(args.protocol), args.host, args.port, name="a")
    ]
    if args.port_b is not None:
        services.append(
            await takeover.start_server(
                protocol_class(args.protocol_b), args.host, args.port_b, name="b"
            )
        )
    names = ", ".join(s.service_name for s in services)
    await takeover.serve_until_moved(
        *services,
        **takeover.control_options(args),
        ready=lambda m: print(f"serving {names} on {args.host}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="service a's port")
    parser.add_argument("--port-b", type=int, help="service b's port (no service b if absent)")
    parser.add_argument("--protocol", help="service a's protocol class, MODULE:CLASS")
    parser.add_argument("--protocol-b", help="service b's protocol class, MODULE:CLASS")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop to serve on",
    )
    takeover.add_control_options(parser)
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop  # an application serves on uvloop by running its loop there

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
