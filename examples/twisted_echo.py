"""A Twisted line echo server that can move to another process with its connections.

python examples/twisted_echo.py --port 8007 --control /tmp/echo.sock
takeover take --runtime twisted /tmp/echo.sock   # another process takes it; clients stay

With ``--unix PATH`` it listens on an AF_UNIX stream socket instead.
"""

from __future__ import annotations

import argparse

from twisted.internet import interfaces, protocol
from zope.interface import implementer

import takeover.twisted as takeover


@implementer(interfaces.IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes each complete line; a partial line waits (and moves) until its end.

    When the client shuts its side, the echo closes once everything is sent.
    """

    def __init__(self) -> None:
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        if lines and self.transport is not None:
            self.transport.write(b"\n".join(lines) + b"\n")

    def readConnectionLost(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class EchoFactory(protocol.Factory):
    protocol = Echo


def main(args: argparse.Namespace) -> None:
    reactor = takeover.install_reactor()
    if args.unix:
        port = takeover.listen_unix(args.unix, EchoFactory(), name="echo")
        where = args.unix
    else:
        port = takeover.listen_tcp(args.port, EchoFactory(), name="echo", interface=args.host)
        where = f"{args.host}:{args.port}"
    done = takeover.serve_until_moved(
        port,
        **takeover.control_options(args),
        release_address=args.release_address,  # a move to another host (docs/crosshost.md)
        ready=lambda m: print(f"echo on {where}, control {m.path}", flush=True),
    )
    done.addErrback(lambda failure: print(failure.getTraceback(), flush=True))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8007)
    parser.add_argument("--unix", metavar="PATH", help="listen on this AF_UNIX path instead")
    takeover.add_control_options(parser)
    takeover.add_release_address_option(parser)
    main(parser.parse_args())
