"""A Twisted program that takes services with the API, in its own reactor.

    python tests/apps/twisted_recipient.py --control /tmp/c.sock

It takes every service at CONTROL with ``takeover.twisted.take``, prints
``took NAME N`` for each, publishes them again at CONTROL with
``serve_until_moved`` (replacing the path) and runs until they have moved on.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import takeover.twisted as takeover


def main(control: str) -> None:
    reactor = takeover.install_reactor()

    def taken(results: list[Any]) -> Any:
        for result in results:
            print(f"took {result.name} {result.connections} pid {os.getpid()}", flush=True)
        return takeover.serve_until_moved(
            *(result.service for result in results),
            control=control,
            replace=True,
            ready=lambda m: print(f"serving at {m.path}", flush=True),
        )

    def failed(failure: Any) -> None:
        print(f"failed: {failure.getErrorMessage()}", flush=True)

    def begin() -> None:
        done = takeover.take(control, reactor=reactor)
        done.addCallback(taken)
        done.addErrback(failed)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True)
    main(parser.parse_args().control)
