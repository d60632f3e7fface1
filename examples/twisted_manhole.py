"""A Twisted manhole (a live Python prompt) over telnet, with a login, that can move.

The 2004 paper's demonstration on today's Twisted: ``twisted.conch``'s
``ColoredManhole`` behind telnet authentication. Log in, define variables,
import modules; then ``takeover take --runtime twisted --allow
twisted.conch.manhole --allow codeop CONTROL`` (with the same or another
interpreter) moves the server and every logged-in session, namespace,
history and terminal state included, to a new process.

python examples/twisted_manhole.py --port 8023 --control /tmp/manhole.sock
telnet 127.0.0.1 8023       # username admin, password admin (see --user)

The recipient allows ``twisted.conch.manhole`` and ``codeop`` by name
because a manhole session carries an interpreter that runs the source it is
given: allowing them trusts the originator like the application's own code.
"""

from __future__ import annotations

import argparse
import builtins
from typing import Any

from twisted.conch import telnet
from twisted.conch.insults import insults
from twisted.cred import checkers, portal
from twisted.internet import protocol
from zope.interface import implementer

import takeover.twisted as takeover


def logout() -> None:
    """What the realm hands back to call when a session ends (nothing to do)."""


@implementer(portal.IRealm)
class Realm:
    """Each login gets a ColoredManhole with a namespace of its own."""

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        # Imported here: twisted.conch.manhole imports the reactor, and the
        # asyncio reactor must be installed first (main() does it).
        from twisted.conch import manhole

        if telnet.ITelnetProtocol not in interfaces:
            raise NotImplementedError(interfaces)
        # __builtins__ given as the module (which travels by name), not the
        # dict of every builtin function exec() would otherwise put there.
        namespace = {"__builtins__": builtins, "__name__": "__manhole__"}
        shell = telnet.TelnetBootstrapProtocol(
            insults.ServerProtocol, manhole.ColoredManhole, namespace
        )
        return telnet.ITelnetProtocol, shell, logout


class ManholeFactory(protocol.ServerFactory):
    """Telnet, then a login, then the manhole."""

    def __init__(self, users: dict[str, str]) -> None:
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(
            **{name: password.encode() for name, password in users.items()}
        )
        self.portal = portal.Portal(Realm(), [checker])

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        transport = telnet.TelnetTransport(telnet.AuthenticatingTelnetProtocol, self.portal)
        transport.factory = self
        return transport


def main(args: argparse.Namespace) -> None:
    reactor = takeover.install_reactor()
    users = dict(user.split(":", 1) for user in args.user or ["admin:admin"])
    port = takeover.listen_tcp(
        args.port, ManholeFactory(users), name="manhole", interface=args.host
    )
    done = takeover.serve_until_moved(
        port,
        **takeover.control_options(args),
        ready=lambda m: print(f"manhole on {args.host}:{args.port}, control {m.path}", flush=True),
    )
    done.addErrback(lambda failure: print(failure.getTraceback(), flush=True))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8023)
    parser.add_argument(
        "--user",
        action="append",
        metavar="NAME:PASSWORD",
        help="a telnet login (repeatable; default admin:admin)",
    )
    takeover.add_control_options(parser)
    main(parser.parse_args())
