"""The ``takeover`` command line (also ``python -m takeover``).

    takeover list CONTROL [--json]
    takeover take CONTROL [--service NAME]... [--json] [--allow MODULE]... [--trust]
                  [--runtime asyncio|twisted] [--loop asyncio|uvloop]
                  [--admit-user USER]... [--admit-group GROUP]...
    takeover demo [serve [--port N] [--control PATH] [--user NAME:PASSWORD]...]
    takeover check CONTROL [--service NAME]... [--json]
    takeover run --control PATH [--successor COMMAND] -- COMMAND...

``run`` is an anchor for supervisors (systemd, supervisord, a container's
PID 1): a process whose PID never changes, which starts COMMAND, starts a
successor on SIGHUP, and exits with the last server's status once no server
is left (see ``takeover.anchor``).

``check`` is a dry run: the originator pickles each service's graph and throws
it away, pausing nothing, and says what would stop it from moving. It exits 0
when every service checked can move, 1 otherwise.

``take`` is the generic recipient: it needs none of the application's code on
its command line, since the graph names the modules and the script it needs.
It rebuilds only vetted constructors and the application's classes (its
script's, takeover's runtime's, ``--allow`` modules'): see ``takeover._core.policy``.
``--trust`` turns that check off.
Every failure prints one line, ``takeover: error: <reason>``, and exits with a
non-zero status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from ._core import logs
from ._core.errors import TakeoverError
from ._core.options import (
    add_admission_options,
    add_limit_options,
    add_pid_file_option,
    add_release_address_option,
    add_security_options,
    admission_options,
    limits,
    security_options,
)
from ._core.protocol import DEFAULT_IN_DOUBT_WAIT
from ._core.recipient import CheckResult, Taken, select

if TYPE_CHECKING:
    from .asyncio import MigrationServer

EXIT_FAILURE = 1
EXIT_PARTIAL = 3

log = logging.getLogger("takeover.cli")


class CommandError(Exception):
    """A failure the command line reports in one line."""


def _describe_connect_error(control: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no migration server at {control}: the path does not exist"
    if isinstance(exc, ConnectionRefusedError):
        return f"no migration server is listening at {control} (a stale socket file?)"
    if isinstance(exc, PermissionError):
        return (
            f"permission denied opening {control}: run as the user that owns it, or have "
            "its migration server admit this user (--admit-user or --admit-group), with a "
            "directory this user may enter"
        )
    return f"cannot connect to {control}: {exc}"


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """``secret``, ``tls``, ``limits`` and the admissions from the control options."""
    try:
        return {**security_options(args), **admission_options(args), "limits": limits(args)}
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot read secret file {args.secret_file}: {exc}") from exc


def _unpickling(args: argparse.Namespace) -> dict[str, Any]:
    """``allow`` and ``trust`` (``take`` only): which globals a graph may name."""
    allow = tuple(getattr(args, "allow", ()))
    if getattr(args, "runtime", "asyncio") == "twisted":
        from .twisted import GRAPH_MODULES

        allow = (*GRAPH_MODULES, *allow)
    return {"allow": allow, "trust": getattr(args, "trust", False)}


async def _connect(args: argparse.Namespace) -> Any:
    from .asyncio import connect

    control = args.control
    try:
        return await connect(control, **_security(args), **_unpickling(args))
    except TakeoverError:
        raise
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(_describe_connect_error(control, exc)) from exc


async def _list(args: argparse.Namespace) -> int:
    session = await _connect(args)
    try:
        services = await session.list()
    finally:
        await session.close()
    if args.json:
        for service in services:
            print(json.dumps(service, sort_keys=True))
        return 0
    if not services:
        print(f"no services published at {args.control}")
        return 0
    rows: list[tuple[str, ...]] = [
        ("SERVICE", "STATE", "CONNECTIONS", "KIND", "ADDRESS", "DRAINING")
    ]
    rows += [
        (
            str(s.get("name")),
            str(s.get("state")),
            str(s.get("connections", "")),
            str(s.get("kind", "")),
            str(s.get("address", "")),
            _draining(s.get("draining")),
        )
        for s in services
    ]
    if not any(row[5] for row in rows[1:]):
        rows = [row[:5] for row in rows]  # no partial move: no DRAINING column
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _draining(draining: Any) -> str:
    """What ``list`` says of connections a partial move left in the old process."""
    if not isinstance(draining, dict):
        return ""
    until = draining.get("until")
    left = f", {max(0, int(until - time.time()))} s left" if isinstance(until, float) else ""
    return f"{draining.get('connections')} in pid {draining.get('pid')}{left}"


def _report(taken: Taken, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "taken", **taken.summary()}, sort_keys=True), flush=True)
    else:
        draining = ""
        if taken.draining:
            draining = (
                f" ({taken.draining} draining in the old process "
                f"for up to {taken.drain_seconds:g} s)"
            )
        print(
            f"took {taken.name}: {taken.connections} connections{draining}, "
            f"paused {taken.pause_ms:.3f} ms, {taken.fds} fds, {taken.graph_bytes} bytes",
            flush=True,
        )


def _raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit.

    A service brings a descriptor per connection; past the soft limit (often
    1024) the kernel drops them (MSG_CTRUNC) and the move fails.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def _take(args: argparse.Namespace) -> int:
    from .asyncio import take_and_serve

    _raise_nofile()
    runtime: Any = None
    if args.runtime == "twisted":
        from .twisted import install_reactor

        runtime = install_reactor()
    taken: list[Taken] = []

    def on_taken(result: Taken) -> None:
        taken.append(result)
        _report(result, args.json)

    def on_failed(name: str, exc: TakeoverError) -> None:
        print(f"takeover: error: {exc}", file=sys.stderr, flush=True)

    def on_serving(migration: MigrationServer) -> None:
        if args.json:
            print(json.dumps({"event": "serving", "control": migration.path, "pid": os.getpid()}))
        else:
            print(f"serving {len(taken)} service(s) at {migration.path} (pid {os.getpid()})")
        sys.stdout.flush()
        if args.detached is not None:
            # The command that started this one may return now (see _detach).
            os.write(args.detached, b"serving\n")
            os.close(args.detached)
            args.detached = None

    try:
        result = await take_and_serve(
            args.control,
            args.service,
            runtime=runtime,
            **_security(args),
            **_unpickling(args),
            on_taken=on_taken,
            on_failed=on_failed,
            on_serving=on_serving,
            pid_file=args.pid_file,
            drain=args.drain,
            **_cross_host(args),
        )
    except TakeoverError:
        raise
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        if not taken:
            raise CommandError(_describe_connect_error(args.control, exc)) from exc
        raise CommandError(f"cannot publish the services taken again: {exc}") from exc
    if not result.taken:
        return EXIT_FAILURE
    return EXIT_PARTIAL if result.failed else 0


def _cross_host(args: argparse.Namespace) -> dict[str, Any]:
    """``take``'s options of a move across hosts (only those given)."""
    options: dict[str, Any] = {}
    if args.cross_host:
        options["cross_host"] = True
        options["acquire_address"] = args.acquire_address
        options["in_doubt_wait"] = args.in_doubt_wait
    elif args.acquire_address:
        raise CommandError("--acquire-address is for a move across hosts: add --cross-host")
    if args.release_address:
        options["release_address"] = args.release_address
    return options


def _report_check(result: CheckResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.summary(), sort_keys=True), flush=True)
    elif result.ok:
        print(f"{result.name}: ok", flush=True)
    else:
        print(f"{result.name}: cannot move: {result.path}: {result.error}", flush=True)


async def _check(args: argparse.Namespace) -> int:
    session = await _connect(args)
    results: list[CheckResult] = []
    try:
        names = select(await session.list(), args.service)
        for name in names:
            result = await session.check(name)
            results.append(result)
            _report_check(result, args.json)
    finally:
        await session.close()
    if not results and not args.json:
        print(f"no services published at {args.control}")
    return 0 if all(result.ok for result in results) else EXIT_FAILURE


def _detach(args: argparse.Namespace) -> int | None:
    """``take --detach``: fork; this process returns once the child serves.

    Returns the parent's exit status (0 once the child said it serves, 1 if
    it exited first); None in the child, which goes on with the take. What
    an ``ExecReload=`` needs: it must return, while the new server stays in
    the unit (the old one hands it MAINPID).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        args.detached = write
        return None
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    if said.startswith(b"serving"):
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code > 0 else EXIT_FAILURE


def _run_anchor(args: argparse.Namespace) -> int:
    import shlex

    from .anchor import run

    command = list(args.command_line)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CommandError("run: give the server's command after --")
    if args.verbose == 0:
        logging.getLogger("takeover.anchor").setLevel(logging.INFO)
    successor = shlex.split(args.successor) if args.successor else []
    return run(command, args.control, successor)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


def _control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "control",
        metavar="CONTROL",
        help="the migration server: a socket path, or tcp:HOST:PORT",
    )
    add_security_options(parser)
    add_admission_options(parser)
    add_limit_options(parser)
    _log_format_argument(parser)


def _log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log to stderr as text lines (default) or one JSON object per line; every move "
        "is logged, on both sides",
    )


def _service_arguments(parser: argparse.ArgumentParser, verb: str, json_help: str) -> None:
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a service to {verb} (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help=json_help)


def _take_parser(commands: Any) -> None:
    p = commands.add_parser(
        "take", help="take services into this process, serve them, and publish them again"
    )
    _control_arguments(p)
    _service_arguments(p, "take", "one JSON object per line")
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE",
        help="let the graphs name classes and functions of MODULE and its submodules "
        "(repeatable; the originator's script and takeover's runtime classes are always "
        "allowed; the demo shell needs --allow takeover.demo)",
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help="turn the unpickling policy off: the originator may run any code here",
    )
    add_pid_file_option(p)
    p.add_argument(
        "--drain",
        type=float,
        metavar="SECONDS",
        help="a partial move: connections that cannot move (a coroutine serves them, TLS, "
        "an unpicklable protocol) stay and drain in the old process for up to SECONDS; "
        "the listener and the others move",
    )
    p.add_argument(
        "--cross-host",
        action="store_true",
        help="the originator (CONTROL is tcp:HOST:PORT) runs on another host: established "
        "TCP connections are rebuilt here by TCP_REPAIR (root or CAP_NET_ADMIN on both "
        "hosts; see docs/crosshost.md); the services are published again at the same "
        "port on every address of this host",
    )
    p.add_argument(
        "--acquire-address",
        metavar="CMD",
        help="with --cross-host: the shell command that makes the service address this "
        "host's at the commit, e.g. 'ip addr add 10.0.0.100/24 dev eth0 && "
        "arping -U -c 1 -I eth0 10.0.0.100'",
    )
    p.add_argument(
        "--in-doubt-wait",
        type=float,
        default=DEFAULT_IN_DOUBT_WAIT,
        metavar="SECONDS",
        help="with --cross-host: if the control channel fails after this side is ready and "
        "before the originator's COMMIT arrives, ask the originator again (new connections) "
        "what it decided for up to SECONDS, then presume it rolled back "
        f"(default {DEFAULT_IN_DOUBT_WAIT:g})",
    )
    add_release_address_option(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once the services serve here (or the take failed), leaving this "
        "process serving them in the background: for ExecReload= without `takeover run`",
    )
    p.add_argument(
        "--runtime",
        choices=("asyncio", "twisted"),
        default="asyncio",
        help="the event loop to serve the services in: asyncio (default) or a Twisted "
        "reactor (Twisted's asyncio reactor; Twisted's protocol modules are then allowed)",
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="the asyncio event loop to serve in: asyncio's own (default) or uvloop "
        "(CPython only; pip install 'takeover[uvloop]'); not with --runtime twisted",
    )
    p.set_defaults(run=_take)


LOOPS = ("asyncio", "uvloop")
UVLOOP_MISSING = (
    "--loop uvloop: uvloop is not installed in {python} (pip install 'takeover[uvloop]'; "
    "uvloop runs on CPython only)"
)


def _runner(args: argparse.Namespace) -> Callable[[Coroutine[Any, Any, int]], int]:
    """What runs the command's coroutine: ``asyncio.run``, or ``uvloop.run`` for ``--loop uvloop``.

    Checked before anything starts (before ``--detach`` forks): a missing
    uvloop, or uvloop asked of the Twisted runtime, is a usage error.
    """
    if getattr(args, "loop", "asyncio") != "uvloop":
        return asyncio.run
    if getattr(args, "runtime", "asyncio") == "twisted":
        raise CommandError(
            "--loop uvloop cannot serve --runtime twisted: the Twisted runtime runs in "
            "Twisted's own reactor (drop --loop, or take an asyncio service)"
        )
    try:
        import uvloop
    except ImportError:
        raise CommandError(UVLOOP_MISSING.format(python=sys.executable)) from None
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run


def _run_parser(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="supervise a server from a process whose PID never changes (systemd, containers)",
        description="Start COMMAND and supervise it: SIGHUP starts a successor that takes "
        "its services (`takeover take CONTROL` by default), SIGTERM and SIGINT go to the "
        "server, and this process exits with the last server's status once no server is "
        "left. Under systemd (Type=notify) it reports READY, RELOADING and a STATUS line.",
    )
    p.add_argument(
        "--control", required=True, metavar="PATH", help="the server's control socket path"
    )
    p.add_argument(
        "--successor",
        metavar="COMMAND",
        help="the command that takes over on SIGHUP (one shell-quoted string; default: "
        "`takeover take CONTROL` under this interpreter)",
    )
    _log_format_argument(p)
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    p.set_defaults(run=None, sync=_run_anchor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="takeover",
        description="Move live network services between running Python processes.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("list", help="show the services a migration server publishes")
    _control_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per service")
    p.set_defaults(run=_list)

    _take_parser(commands)

    p = commands.add_parser(
        "check", help="dry run: could each service move now? (nothing is paused or moved)"
    )
    _control_arguments(p)
    _service_arguments(p, "check", "one JSON object per service")
    p.set_defaults(run=_check)

    _run_parser(commands)

    p = commands.add_parser(
        "demo",
        help="run the demonstration; `demo serve` runs only its telnet shell server",
    )
    p.add_argument(
        "demo_args",
        nargs=argparse.REMAINDER,
        metavar="serve [--port N] [--control PATH] [--user NAME:PASSWORD]",
        help="serve the telnet Python shell (default: run the whole story)",
    )
    p.set_defaults(run=None, sync=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.detached = None
    try:
        runner = _runner(args)
    except CommandError as exc:
        print(f"takeover: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if getattr(args, "detach", False):
        status = _detach(args)
        if status is not None:
            return status
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    log_format = getattr(args, "log_format", "text")
    # In text, `take` reports what it took (stdout) or why it could not
    # (its one error line) itself: its own move lines would say it twice.
    quiet = ("took", "not-taken") if log_format == "text" and args.command == "take" else ()
    logs.configure(log_format, level, without=quiet)
    try:
        if args.run is None:
            return int(args.sync(args))
        if getattr(args, "runtime", "asyncio") == "twisted":
            from .twisted import run

            return int(run(args.run(args)))
        return int(runner(args.run(args)))
    except (TakeoverError, CommandError) as exc:
        print(f"takeover: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
