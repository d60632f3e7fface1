"""Command-line options for the control channel, shared by ``takeover`` and
by applications that publish services.

An application adds them to its own parser and passes the result on::

    parser = argparse.ArgumentParser()
    takeover.add_control_options(parser)        # --control, --secret-file, --tls-*
    args = parser.parse_args()
    ...
    await takeover.asyncio.serve_until_moved(server, **takeover.control_options(args))
"""

from __future__ import annotations

import argparse
from typing import Any

from ._auth import TLSConfig, load_secret


def add_security_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--secret-file`` and ``--tls-cert/--tls-key/--tls-ca``."""
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="shared secret for mutual authentication (mode 0600; mandatory over TCP unless TLS)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="this side's certificate (TCP only)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key")
    parser.add_argument("--tls-ca", metavar="PEM", help="the CA that signed the peer's certificate")


def add_control_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add ``--control`` (a socket path or ``tcp:HOST:PORT``) and the security options."""
    parser.add_argument(
        "--control",
        required=required,
        metavar="CONTROL",
        help="where to publish services for migration: a socket path, or tcp:HOST:PORT",
    )
    add_security_options(parser)


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"secret": ..., "tls": ...}`` from parsed security options.

    Raises:
        AuthenticationError: the secret file is readable by others.
        OSError: it can't be read.
        ValueError: only some of the TLS options were given.
    """
    secret = load_secret(args.secret_file) if args.secret_file else None
    parts = (args.tls_cert, args.tls_key, args.tls_ca)
    tls = None
    if any(parts):
        if not all(parts):
            raise ValueError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
    return {"secret": secret, "tls": tls}


def control_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"control": ..., "secret": ..., "tls": ...}`` for ``serve_until_moved``."""
    return {"control": args.control, **security_options(args)}
