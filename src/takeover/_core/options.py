"""Command-line options for the control channel, shared by ``takeover`` and
by applications that publish services.

An application adds them to its own parser and passes the result on::

    parser = argparse.ArgumentParser()
    takeover.add_control_options(parser)   # --control, --secret-file, --tls-*, --admit-*, limits
    args = parser.parse_args()
    ...
    await takeover.asyncio.serve_until_moved(server, **takeover.control_options(args))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .auth import TLSConfig, load_secret, resolve_group, resolve_user
from .protocol import Limits

if TYPE_CHECKING:  # argparse is the application's: not imported for a type
    import argparse


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


def _admitted(resolve: Any) -> Any:
    """An argparse ``type``: a name resolved at startup, or a clear usage error."""

    def convert(value: str) -> int:
        import argparse  # the application's parser is running: already imported

        try:
            return int(resolve(value))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = resolve.__name__
    return convert


def add_admission_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--admit-user`` and ``--admit-group`` (repeatable)."""
    parser.add_argument(
        "--admit-user",
        action="append",
        default=[],
        type=_admitted(resolve_user),
        metavar="USER",
        help="also accept peers running as USER (a name or a uid; repeatable): recipients "
        "that take services from here, and originators to take from. The control socket "
        "file becomes mode 0666 and SO_PEERCRED is the gate",
    )
    parser.add_argument(
        "--admit-group",
        action="append",
        default=[],
        type=_admitted(resolve_group),
        metavar="GROUP",
        help="also accept peers whose primary or supplementary group is GROUP (a name or a "
        "gid; repeatable). With one group and no --admit-user the control socket file "
        "belongs to GROUP, mode 0660",
    )


def admission_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"admit_users": ..., "admit_groups": ...}`` from parsed admission options."""
    return {
        "admit_users": tuple(getattr(args, "admit_user", None) or ()),
        "admit_groups": tuple(getattr(args, "admit_group", None) or ()),
    }


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--step-timeout``, ``--max-frame-size`` and ``--max-fds``."""
    defaults = Limits()
    for flag, kind, default, metavar, help in (
        (
            "--step-timeout",
            float,
            defaults.step_timeout,
            "SECONDS",
            "how long to wait for the peer's next step while a service is in transit "
            f"(default {defaults.step_timeout:g}); a stalled peer causes a rollback",
        ),
        (
            "--max-frame-size",
            int,
            defaults.max_frame_size,
            "BYTES",
            f"largest control frame accepted (default {defaults.max_frame_size})",
        ),
        (
            "--max-fds",
            int,
            defaults.max_fds,
            "N",
            f"most descriptors one service may bring (default {defaults.max_fds})",
        ),
    ):
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=help)


def limits(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` that parsed limit options ask for."""
    if args.step_timeout is not None and args.step_timeout <= 0:
        raise ValueError("--step-timeout must be positive")
    if args.max_frame_size < 1024 or args.max_fds < 1:
        raise ValueError("--max-frame-size must be at least 1024 and --max-fds at least 1")
    return Limits(
        max_frame_size=args.max_frame_size, max_fds=args.max_fds, step_timeout=args.step_timeout
    )


def add_control_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add ``--control`` (a socket path or ``tcp:HOST:PORT``), ``--pid-file``,
    ``--log-format``, the security options, the admission options and the
    limit options."""
    parser.add_argument(
        "--control",
        required=required,
        metavar="CONTROL",
        help="where to publish services for migration: a socket path, or tcp:HOST:PORT",
    )
    add_pid_file_option(parser)
    add_log_format_option(parser)
    add_security_options(parser)
    add_admission_options(parser)
    add_limit_options(parser)


def add_release_address_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--release-address CMD`` (a move to another host, docs/crosshost.md)."""
    parser.add_argument(
        "--release-address",
        metavar="CMD",
        help="a move to another host (takeover take --cross-host): the shell command that "
        "gives up the service address here at its commit, e.g. "
        "'ip addr del 10.0.0.100/24 dev eth0' (its failure rolls the move back)",
    )


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format text|json``."""
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="how to log (to stderr): text lines, or one JSON object per line; every move "
        "is logged on both sides",
    )


def add_pid_file_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--pid-file``."""
    parser.add_argument(
        "--pid-file",
        metavar="PATH",
        help="keep PATH naming the process that serves (replaced atomically at each move; "
        "the successor carries it on)",
    )


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
    """``control``, ``secret``, ``tls``, ``limits``, ``pid_file``,
    ``log_format``, ``admit_users`` and ``admit_groups`` for ``serve_until_moved``."""
    return {
        "control": args.control,
        "limits": limits(args),
        "pid_file": getattr(args, "pid_file", None),
        "log_format": getattr(args, "log_format", None),
        **security_options(args),
        **admission_options(args),
    }
