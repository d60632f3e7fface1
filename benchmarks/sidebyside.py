"""takeover side by side with what is done today to replace a running server.

    python benchmarks/sidebyside.py [--server protocol|streams] [--repeats 3]
        [--connections 50] [--drain 2] [--warmup 1] [--cooldown 2] [--churn-clients 1]
        [--strategies restart,reuseport,handoff,takeover] [--out DIR] [--name sidebyside]

The same workload, in the same run, against four ways of replacing a line-echo
server process with a new one:

* ``restart``: stop and restart: SIGTERM the old process (it closes its
  listener and connections and exits), then start the new one.
* ``reuseport``: overlapped restart: start the new process on the same port
  with SO_REUSEPORT; once it accepts, SIGTERM the old one.
* ``handoff``: listener hand-off with drain (nginx, HAProxy, Envoy, tableflip):
  the new process receives the listening socket over SCM_RIGHTS; the old one
  stops accepting and keeps its connections until ``--drain`` seconds have
  passed, then closes them and exits.
* ``takeover``: ``python -m takeover take --json CONTROL``.

Two servers (``--server``):

* ``protocol`` (the default): an ``asyncio.Protocol``, ``Echo``. takeover
  moves the listener and every connection.
* ``streams``: the same echo as an ``asyncio.start_server`` coroutine
  (``client_connected_cb``). Its connections cannot move, so takeover's move
  is partial: the listener (with its accept queue) moves, and the old process
  serves its connections until ``--drain`` seconds have passed (the server's
  ``start_server(..., drain=...)``), then closes them and exits.

The baselines are ``_plain_echo.py`` (plain asyncio, the same ``Echo``, or
with ``--streams`` the same coroutine); the takeover server is
``_echo_app.py`` (``--streams`` likewise). The workload (``_client.py``): N
long-lived connections each sending a line every ``--interval`` ms and waiting
for its echo (a connection the server closes is reopened, refused attempts
retried every 10 ms, and its unanswered line sent again), plus one client
opening a new connection for one line every 2 ms (``--churn-clients``
processes). The replacement starts
``--warmup`` s into the run; the run lasts warmup + drain + cooldown for
every strategy.

Writes ``DIR/NAME.json`` and ``DIR/NAME.md``; ``--render NAME.json`` redraws the
markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repository's root: harness/ (processes, shared with the tests; not installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
from _common import percentile
from load import read_samples, series

from harness.procs import PYTHON, Proc, free_port

PLAIN = os.path.join(_common.HERE, "_plain_echo.py")
CLIENT = os.path.join(_common.HERE, "_client.py")
TIMEOUT = 60.0
PIN: dict[str, list[int]] = {"server": [], "client": []}
"""CPUs for the servers and for the clients (``--no-pin``: none)."""
STRATEGIES = ("restart", "reuseport", "handoff", "takeover")
SERVERS = ("protocol", "streams")
LABELS = {
    "restart": "stop and restart",
    "reuseport": "overlapped restart (SO_REUSEPORT)",
    "handoff": "listener hand-off + drain",
    "takeover": "takeover",
}


class Exit:
    """Records when a process exits, from a thread of its own."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.at: float | None = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        self.proc.popen.wait()
        self.at = time.monotonic()

    def join(self, timeout: float) -> float:
        self.thread.join(timeout)
        if self.at is None:
            raise RuntimeError(f"{self.proc.argv[1:]} did not exit within {timeout} s")
        return self.at


def plain(server: str, *argv: str) -> list[str]:
    """A baseline server's command line."""
    return [PYTHON, PLAIN, *argv, *(["--streams"] if server == "streams" else [])]


def start_old(strategy: str, port: int, workdir: str, drain: float, server: str) -> Proc:
    if strategy == "takeover":
        control = os.path.join(workdir, "c.sock")
        argv = [PYTHON, os.path.join(_common.HERE, "_echo_app.py")]
        argv += ["--port", str(port), "--control", control]
        if server == "streams":
            argv += ["--streams", "--drain", str(drain)]
    else:
        argv = plain(server, "--port", str(port), "--drain", str(drain))
        if strategy == "reuseport":
            argv.append("--reuseport")
        if strategy == "handoff":
            argv += ["--handoff", os.path.join(workdir, "h0.sock")]
    proc = Proc(argv, cpus=PIN["server"])
    proc.event("ready", TIMEOUT)
    return proc


def upgrade(
    strategy: str, old: Proc, port: int, workdir: str, drain: float, server: str
) -> tuple[Proc, dict[str, Any]]:
    """Replace ``old``; return the new process and the timings from the start."""
    gone = Exit(old)
    t0 = time.monotonic()
    info: dict[str, Any] = {"start": t0}
    if strategy == "restart":
        old.popen.send_signal(signal.SIGTERM)
        gone.join(TIMEOUT)
        new = Proc(plain(server, "--port", str(port)), cpus=PIN["server"])
        new.event("ready", TIMEOUT)
        serving = time.monotonic()
    elif strategy == "reuseport":
        new = Proc(plain(server, "--port", str(port), "--reuseport"), cpus=PIN["server"])
        new.event("ready", TIMEOUT)
        serving = time.monotonic()
        old.popen.send_signal(signal.SIGTERM)
    elif strategy == "handoff":
        argv = plain(server, "--fd-from", os.path.join(workdir, "h0.sock"), "--drain", str(drain))
        new = Proc(argv, cpus=PIN["server"])
        new.event("ready", TIMEOUT)
        serving = time.monotonic()
    else:
        control = os.path.join(workdir, "c.sock")
        argv = [PYTHON, "-m", "takeover", "take", "--json", control]
        new = Proc(argv, cpus=PIN["server"])
        taken = new.event("taken", TIMEOUT)
        info["pause_ms"] = taken["pause_ms"]
        info["moved"] = taken["connections"]
        info["draining"] = taken.get("draining", 0)
        new.event("serving", TIMEOUT)
        serving = time.monotonic()
    info["old_gone_ms"] = (gone.join(drain + TIMEOUT) - t0) * 1000
    info["new_serving_ms"] = (serving - t0) * 1000
    info["old_exit"] = old.popen.returncode
    return new, info


def run_strategy(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="tks", dir="/tmp")
    procs: list[Proc] = []
    duration = args.warmup + args.drain + args.cooldown
    try:
        port = free_port()
        old = start_old(strategy, port, workdir, args.drain, args.server)
        procs.append(old)
        common = [PYTHON, CLIENT, "--port", str(port), "--duration", str(duration)]
        long_lived = Proc(
            [
                *common,
                "--connections",
                str(args.connections),
                "--interval",
                str(args.interval),
                "--reconnect",
                "--samples",
                os.path.join(workdir, "long.bin"),
            ],
            stdin=True,
            cpus=PIN["client"],
        )
        procs.append(long_lived)
        churns = [
            Proc(
                [*common, "--churn", "--samples", os.path.join(workdir, f"churn{i}.bin")],
                stdin=True,
                cpus=PIN["client"],
            )
            for i in range(args.churn_clients)
        ]
        procs += churns
        long_lived.event("connected", TIMEOUT)
        for churn in churns:
            churn.event("connected", TIMEOUT)
        load_before = os.getloadavg()
        long_lived.send_line("go")
        for churn in churns:
            churn.send_line("go")
        t0 = float(long_lived.event("started", TIMEOUT)["t0"])
        # The replacement starts --warmup s into the run: the schedule, not a wait.
        time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
        new, info = upgrade(strategy, old, port, workdir, args.drain, args.server)
        procs.append(new)
        long_done = long_lived.event("done", duration + TIMEOUT)
        churn_dones = [churn.event("done", duration + TIMEOUT) for churn in churns]
        new.popen.send_signal(signal.SIGTERM)
        new.wait(TIMEOUT)
        long_samples = read_samples(os.path.join(workdir, "long.bin"))
        churn_samples = [
            sample
            for i in range(args.churn_clients)
            for sample in read_samples(os.path.join(workdir, f"churn{i}.bin"))
        ]
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    long_lat = sorted(lat for _sent, lat in long_samples)
    # The replacement's window: from its start to the old process gone and the new
    # one serving, plus 100 ms; latency outside it is the machine's own noise.
    start = info["start"]
    until = start + max(info["old_gone_ms"], info["new_serving_ms"]) / 1000 + 0.1
    inside = [lat for sent, lat in long_samples if sent <= until and sent + lat >= start]
    outside = [lat for sent, lat in long_samples if not (sent <= until and sent + lat >= start)]
    churn_lat = sorted(lat for _sent, lat in churn_samples)
    failures = sorted(f for done in churn_dones for f in done["failures"])
    counts = {k: sum(done["counts"][k] for done in churn_dones) for k in churn_dones[0]["counts"]}
    return {
        "strategy": strategy,
        **{k: v for k, v in info.items() if k != "start"},
        "upgrade_at": start - t0,
        "long_completed": long_done["completed"],
        "long_broken": long_done["broken"],
        # When (s from the start of the replacement) and how each long-lived
        # connection was closed: "eof" (a FIN), else the error (a reset).
        "long_breaks": [[round(at - start, 5), kind] for at, kind in long_done["breaks"]],
        "long_refused_reconnects": long_done["refused"],
        "long_errors": long_done["errors"],
        "long_first_errors": long_done["first_errors"],
        "long_unfinished": long_done["unfinished"],
        "long_p50_ms": percentile(long_lat, 50) * 1000,
        "long_p99_ms": percentile(long_lat, 99) * 1000,
        "long_max_ms": (long_lat[-1] if long_lat else float("nan")) * 1000,
        "long_max_during_ms": max(inside, default=float("nan")) * 1000,
        "long_max_outside_ms": max(outside, default=float("nan")) * 1000,
        "new_attempts": sum(done["attempts"] for done in churn_dones),
        "new_ok": counts["ok"],
        "new_refused": counts["refused"],
        "new_reset": counts["reset"],
        "new_timeout": counts["timeout"],
        "new_other": counts["other"],
        "new_failed_window_ms": ((failures[-1][0] - failures[0][0]) * 1000 if failures else 0.0),
        "new_max_ms": (churn_lat[-1] if churn_lat else float("nan")) * 1000,
        "long_series": series(long_samples, t0, duration),
        "new_failures": [[round(at - start, 5), kind] for at, kind in failures],
        "client_stalls": long_done["client_stalls"],
        "loadavg": [load_before, os.getloadavg()],
    }


# -- the report ----------------------------------------------------------------


def cell(values: Sequence[float | None], digits: int = 1) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ratio(data: dict[str, Any], strategy: str, key: str) -> list[float | None]:
    """``key`` of ``strategy`` over takeover's, per repeat."""
    out: list[float | None] = []
    for repeat in range(data["repeats"]):
        a = [r for r in data["runs"] if r["strategy"] == strategy and r["repeat"] == repeat]
        b = [r for r in data["runs"] if r["strategy"] == "takeover" and r["repeat"] == repeat]
        if a and b and b[0][key]:
            out.append(a[0][key] / b[0][key])
    return out


def runnable(data: dict[str, Any]) -> str:
    values = [r["quiet"]["runnable"] for r in data["runs"] if r.get("quiet")]
    return cell(values, 1) if values else "n/a"


def loadavg(data: dict[str, Any]) -> str:
    """The 1-minute load average at the start of the runs: the machine is shared."""
    values = [r["loadavg"][0][0] for r in data["runs"] if r.get("loadavg")]
    return cell(values, 2) + " (median, (min..max))" if values else "n/a"


def _servers(data: dict[str, Any]) -> dict[str, list[str]]:
    """What the report says of the server: the title's tail, the takeover strategy,
    the servers' files."""
    if data.get("server", "protocol") == "protocol":
        return {
            "title": [],
            "takeover": [
                "- **takeover**: `python -m takeover take --json CONTROL` takes the listener and",
                "  every connection; the old process exits once the move is committed.",
            ],
            "files": [
                "Baselines: `benchmarks/_plain_echo.py` (plain asyncio, `harness/echo.py`'s",
                "`Echo`, the line echo of `examples/echo.py`); takeover: `benchmarks/_echo_app.py`",
                "(the same `Echo`).",
            ],
        }
    drain = f"{data['drain']:g}"
    return {
        "title": [": a coroutine (asyncio streams) server"],
        "takeover": [
            "- **takeover**: `python -m takeover take --json CONTROL` takes the listener, with its",
            "  accept queue. The connections cannot move (a coroutine serves each), so the move",
            "  is partial: they stay in the old process, which serves them until they close or",
            f"  the drain deadline ({drain} s, the server's `start_server(..., drain={drain})`)",
            "  passes, then closes them (`transport.close()`) and exits.",
        ],
        "files": [
            "The server is the line echo as an `asyncio.start_server`-style",
            "`client_connected_cb(reader, writer)` coroutine, `harness/echo.py`'s `serve_lines`,",
            "one per connection. Baselines: `benchmarks/_plain_echo.py --streams` (plain",
            "`asyncio.start_server`); takeover: `benchmarks/_echo_app.py --streams`",
            "(`takeover.asyncio.start_server` with the same coroutine).",
        ],
    }


def _migrate_req(data: dict[str, Any]) -> list[str]:
    value = data.get("tcp_migrate_req")
    if value is None:
        return []
    what = (
        "a closing SO_REUSEPORT listener resets the connections queued on it, not yet accepted"
        if value == "0"
        else "a closing SO_REUSEPORT listener passes its queued connections to another"
    )
    return [f"- net.ipv4.tcp_migrate_req: {value} ({what})"]


def _closes(data: dict[str, Any]) -> list[str]:
    """How and when the long-lived connections were closed, per strategy."""
    if not any("long_breaks" in r for r in data["runs"]):
        return []
    rows = []
    for strategy in STRATEGIES:
        runs = [r for r in data["runs"] if r["strategy"] == strategy and "long_breaks" in r]
        if not runs:
            continue

        def times(run: dict[str, Any]) -> list[float]:
            return [at * 1000 for at, _kind in run["long_breaks"]]

        rows.append(
            [
                LABELS[strategy],
                cell([sum(k == "eof" for _at, k in r["long_breaks"]) for r in runs], 0),
                cell([sum(k != "eof" for _at, k in r["long_breaks"]) for r in runs], 0),
                cell([min(times(r), default=None) for r in runs], 0),
                cell([max(times(r), default=None) for r in runs], 0),
                cell([r["long_refused_reconnects"] for r in runs], 0),
            ]
        )
    return [
        "",
        "## Long-lived connections closed by the server",
        "",
        *_table(
            [
                "strategy",
                "closed (FIN)",
                "reset",
                "first close, ms after the start",
                "last close, ms after the start",
                "reconnect attempts refused",
            ],
            rows,
        ),
        "",
        "Each close is one long-lived connection broken; the client reopens it at once and",
        "sends its unanswered line again. *Reset*: the client read ECONNRESET (a server that",
        "closes a socket with unread input sends a reset).",
    ]


def _churn_text(clients: int) -> list[str]:
    if clients == 1:
        return [
            "one client opening a new connection for one line every 2 ms (after a failure, 5 ms)."
        ]
    return [
        f"{clients} client processes, each opening a new connection for one line every 2 ms",
        "(after a failure, 5 ms).",
    ]


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    server = _servers(data)
    out = [
        "# takeover side by side with restarts and listener hand-off" + "".join(server["title"]),
        "",
        f"Produced by `{data['command']}` on {data['date']} (commit {m.get('commit') or '?'}"
        f"{', src/ modified' if m.get('src_dirty') else ''}), {data['repeats']} repeat(s) of"
        " each strategy, interleaved.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m.get('memory_mb', '?')} MB RAM",
        f"- Python: {m['python']}",
        f"- Kernel: {m['kernel']}",
        f"- Load average (1 min) at the start of each run: {loadavg(data)}",
        f"- Runnable processes besides the benchmark at the start of each run: {runnable(data)}"
        f" (each run waited up to {data.get('quiet_wait', 0):g} s for fewer than the CPUs)",
        f"- Processes {data.get('pinning', 'not pinned')}",
        *_migrate_req(data),
        "",
        "The same line-echo server replaced by a new process while clients use it, four ways:",
        "",
        "- **stop and restart**: SIGTERM the old process (it closes its listener and its",
        "  connections and exits), then start the new one, which binds the port.",
        "- **overlapped restart (SO_REUSEPORT)**: start the new process on the same port with",
        "  SO_REUSEPORT; once it accepts, SIGTERM the old one (it closes its listener and its",
        "  connections).",
        "- **listener hand-off + drain** (nginx, HAProxy, Envoy, tableflip): the new process",
        "  receives the listening socket from the old one over SCM_RIGHTS and accepts on it;",
        "  the old one stops accepting and keeps serving its connections until they close or",
        f"  the drain timeout ({data['drain']:g} s) passes, then closes them and exits.",
        *server["takeover"],
        "",
        *server["files"],
        "Every new process is a fresh Python process started at the replacement.",
        "",
        f"Workload (`benchmarks/_client.py`): {data['connections']} long-lived connections, each",
        f"sending a line every {data['interval']:g} ms and waiting for its echo; a connection the",
        "server closes counts as broken and is reopened at once (refused attempts retried every",
        "10 ms), its unanswered line sent again, its latency counted from the first send. Plus",
        *_churn_text(data.get("churn_clients", 1)),
        f"The replacement starts {data['warmup']:g} s into a run of "
        f"{data['warmup'] + data['drain'] + data['cooldown']:g} s.",
        "",
        "Figures: median over the repeats with (min..max). Ratios: the strategy's figure over",
        "takeover's in the same repeat.",
        "",
        "## Results",
        "",
    ]
    rows = []
    for strategy in STRATEGIES:
        runs = [r for r in data["runs"] if r["strategy"] == strategy]
        if not runs:
            continue
        rows.append(
            [
                LABELS[strategy],
                cell([r["new_refused"] for r in runs], 0),
                cell([r["new_reset"] + r["new_other"] for r in runs], 0),
                cell([r["new_timeout"] for r in runs], 0),
                cell([r["new_attempts"] for r in runs], 0),
                cell([r["long_broken"] for r in runs], 0),
                cell([r["long_errors"] for r in runs], 0),
                cell([r["long_max_during_ms"] for r in runs]),
                cell([r["long_max_outside_ms"] for r in runs]),
                cell([r["new_max_ms"] for r in runs]),
                cell([r["old_gone_ms"] for r in runs]),
                cell([r["new_serving_ms"] for r in runs]),
            ]
        )
    out += _table(
        [
            "strategy",
            "new connections refused",
            "new connections reset",
            "new connections timed out (2 s)",
            "new connections tried",
            "long-lived connections broken",
            "wrong answers",
            "worst latency, long-lived, during the replacement ms",
            "worst latency, long-lived, rest of the run ms",
            "worst latency, new connection ms",
            "old process gone after ms",
            "new process serving after ms",
        ],
        rows,
    )
    out += [
        "",
        "Times are from the start of the replacement (the SIGTERM, or starting the new",
        "process). *Worst latency, long-lived*: a line due during a break is answered only",
        "after the reconnection, so it includes it; *during the replacement*: lines in flight",
        "between its start and 100 ms after the old process is gone and the new one serves;",
        "*rest of the run*: every other line, the same workload with nothing happening (what",
        "the machine itself adds). *New connection*: connect + one echo, the worst of those",
        "that succeeded.",
        "",
        "## Against takeover, same repeat",
        "",
    ]
    rows = []
    for strategy in STRATEGIES[:-1]:
        if not any(r["strategy"] == strategy for r in data["runs"]):
            continue
        rows.append(
            [
                LABELS[strategy],
                cell(_ratio(data, strategy, "long_max_during_ms"), 2),
                cell(_ratio(data, strategy, "long_p99_ms"), 2),
                cell(_ratio(data, strategy, "old_gone_ms"), 2),
            ]
        )
    out += _table(
        [
            "strategy",
            "worst long-lived latency during the replacement / takeover's",
            "long-lived p99 / takeover's",
            "old process gone / takeover's",
        ],
        rows,
    )
    runs = [r for r in data["runs"] if r["strategy"] == "takeover"]
    if runs:
        out += [
            "",
            "takeover's moves: pause "
            + cell([r.get("pause_ms") for r in runs], 3)
            + " ms, connections moved "
            + cell([r.get("moved") for r in runs], 0)
            + (
                ", left draining in the old process " + cell([r.get("draining") for r in runs], 0)
                if any(r.get("draining") for r in runs)
                else ""
            )
            + ".",
        ]
    out += _closes(data)
    errors = [e for r in data["runs"] for e in r["long_first_errors"]]
    if errors:
        out += ["", "Wrong answers (first ones):", ""] + [f"- `{e[:300]}`" for e in errors[:10]]
    out += ["", "## Long-lived latency", ""]
    rows = []
    for strategy in STRATEGIES:
        runs = [r for r in data["runs"] if r["strategy"] == strategy]
        if runs:
            rows.append(
                [
                    LABELS[strategy],
                    cell([r["long_p50_ms"] for r in runs], 3),
                    cell([r["long_p99_ms"] for r in runs], 3),
                    cell([r["long_max_ms"] for r in runs], 3),
                    cell([r["long_completed"] for r in runs], 0),
                    cell([len(r.get("client_stalls", [])) for r in runs], 0),
                ]
            )
    out += _table(
        ["strategy", "p50 ms", "p99 ms", "max ms", "lines answered", "client stalls > 50 ms"],
        rows,
    )
    if data.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]]
    out.append("")
    return "\n".join(out)


def write(data: dict[str, Any], directory: str, name: str) -> tuple[str, str]:
    json_path = os.path.join(directory, f"{name}.json")
    md_path = os.path.join(directory, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render(data))
    return json_path, md_path


def _tcp_migrate_req() -> str | None:
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--interval", type=float, default=10.0, help="ms between lines")
    parser.add_argument("--drain", type=float, default=2.0, help="drain timeout, seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds")
    parser.add_argument("--cooldown", type=float, default=2.0, help="seconds")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--churn-clients",
        type=int,
        default=1,
        help="processes opening a new connection every 2 ms each (default 1)",
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="protocol",
        help="an asyncio.Protocol (everything moves) or a streams coroutine (connections drain)",
    )
    _common.add_run_options(parser, "sidebyside")
    args = parser.parse_args(argv)
    if args.render:
        _common.render_only(args.render, write)
        return 0
    _common.raise_nofile()
    strategies = [s for s in args.strategies.split(",") if s]
    PIN["server"], PIN["client"] = _common.cpu_split(not args.no_pin)
    data: dict[str, Any] = {
        **_common.run_header("sidebyside", args),
        "connections": args.connections,
        "interval": args.interval,
        "drain": args.drain,
        "churn_clients": args.churn_clients,
        "warmup": args.warmup,
        "cooldown": args.cooldown,
        "strategies": strategies,
        "server": args.server,
        "tcp_migrate_req": _tcp_migrate_req(),
        "pinning": _common.describe_pinning(PIN["server"], PIN["client"]),
        "runs": [],
    }
    for repeat in range(args.repeats):
        for strategy in strategies:
            quiet = _common.wait_quiet(args.quiet_wait)
            run = run_strategy(strategy, args)
            run["repeat"] = repeat
            run["quiet"] = quiet
            data["runs"].append(run)
            print(
                f"{args.server} {strategy} {repeat + 1}/{args.repeats}: "
                f"new refused {run['new_refused']} "
                f"reset {run['new_reset']} timeout {run['new_timeout']}, "
                f"broken {run['long_broken']}, errors {run['long_errors']}, "
                f"worst {run['long_max_ms']:.1f} ms, old gone {run['old_gone_ms']:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
