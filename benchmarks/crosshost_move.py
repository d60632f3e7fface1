"""What a client feels when a service moves to another host, against a move on
one host, through the library (docs/crosshost.md).

Runs as root on the simulated hosts of the tests (harness/hosts.py: a client,
host A and host B, three network namespaces on a bridge; nothing leaves the
machine). For each size N and repeat:

1. ``examples/echo.py`` serves on host A at the service address, its control
   channel on A's own address (a shared secret);
2. this process opens N idle connections from the client namespace (each
   echoes one line first, so that every one is accepted), and 4 *probe*
   connections that each send a line every millisecond and time its echo;
3. **across hosts**: ``takeover take --cross-host`` in host B (TCP_REPAIR, the
   address moved by ``ip addr`` hooks and a gratuitous ARP);
4. **on one host**: ``takeover take`` in host B again, from that process
   (descriptors passed by SCM_RIGHTS), into a third process;
5. every idle connection echoes a line again (none lost), and the probes'
   lines were all echoed in order.

Reported per move: the library's ``pause_ms`` (the recipient's: the graph's
arrival to the start) and the worst probe round trip while the move ran (what
a client felt: it includes the originator's freeze and the drop table, which
the recipient's pause does not see), as median (min..max) over the repeats,
and the ratios across hosts / on one host.

    python benchmarks/crosshost_move.py --sizes 100,1000,5000,10000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "src"), ROOT, HERE]

import _common  # noqa: E402
import report  # noqa: E402

from harness.hosts import SERVICE_IP, SUBNET, Hosts  # noqa: E402
from harness.procs import PYTHON, Proc  # noqa: E402
from takeover._core import tcprepair  # noqa: E402

PORT = 7007
CONTROL = 9007
PROBES = 4
ECHO = os.path.join(ROOT, "examples", "echo.py")
ENV = {"PYTHONPATH": os.path.join(ROOT, "src")}
ACQUIRE = Hosts.acquire_hook()


class Probe(threading.Thread):
    """A client that sends a line every millisecond and times each echo."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.index = index
        self.samples: list[tuple[float, float]] = []  # (sent, round trip) in s
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        self.sock.settimeout(60)
        buffered = b""
        count = 0
        while not self.stopping.is_set():
            line = b"probe %d %d\n" % (self.index, count)
            sent = time.monotonic()
            try:
                self.sock.sendall(line)
                while b"\n" not in buffered:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    buffered += chunk
            except OSError as exc:
                self.error = f"probe {self.index}: {exc}"
                return
            got, _, buffered = buffered.partition(b"\n")
            if got + b"\n" != line:
                self.error = f"probe {self.index}: {got!r} for {line!r}"
                return
            self.samples.append((sent, time.monotonic() - sent))
            count += 1
            time.sleep(0.001)

    def worst(self, start: float, end: float) -> float:
        """The longest round trip of a line in flight between ``start`` and ``end``."""
        return max(
            (rtt for sent, rtt in self.samples if sent + rtt >= start and sent <= end), default=0.0
        )


def open_idle(count: int) -> list[socket.socket]:
    """``count`` connections to the service, each having echoed one line."""
    made = [socket.create_connection((SERVICE_IP, PORT), 30) for _ in range(count)]
    for sock in made:
        sock.sendall(b"hello\n")
    for sock in made:
        assert sock.recv(16) == b"hello\n"
    return made


def take(into: Any, control_host: str, secret: str, cross: bool, procs: list[Proc]) -> Proc:
    argv = [PYTHON, "-m", "takeover", "take", "--json", f"tcp:{control_host}:{CONTROL}"]
    argv += ["--secret-file", secret, "--release-address", Hosts.del_address_script()]
    if cross:
        argv += ["--cross-host", "--acquire-address", ACQUIRE]
    proc = Proc(into.command(argv), ENV)
    procs.append(proc)
    return proc


def one_move(
    proc: Proc, old: Proc, probes: list[Probe], count: int, timeout: float
) -> dict[str, float]:
    started = time.monotonic()
    line = proc.expect(r'^\{.*"service": "echo"', timeout=timeout).string
    taken = json.loads(line)
    assert taken["connections"] == count + PROBES, taken
    proc.expect('"event": "serving"', timeout=timeout)
    assert old.wait(timeout) == 0, old.output()
    ended = time.monotonic()
    return {
        "pause_ms": float(taken["pause_ms"]),
        "worst_probe_ms": max(p.worst(started, ended) for p in probes) * 1000,
    }


def measure(count: int, workdir: str) -> dict[str, Any]:
    secret = os.path.join(workdir, "secret")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_hex(16))
    procs: list[Proc] = []
    idle: list[socket.socket] = []
    probes: list[Probe] = []
    timeout = 60 + count / 200
    try:
        with Hosts() as hosts:
            a_ip, b_ip = f"{SUBNET}.2", f"{SUBNET}.3"
            argv = [PYTHON, ECHO, "--host", SERVICE_IP, "--port", str(PORT)]
            argv += ["--control", f"tcp:{a_ip}:{CONTROL}", "--secret-file", secret]
            argv += ["--release-address", hosts.del_address_script()]
            on_a = Proc(hosts.a.command(argv), ENV)
            procs.append(on_a)
            on_a.expect("control")
            idle = hosts.client.run(lambda: open_idle(count))
            probe_socks = hosts.client.run(lambda: open_idle(PROBES))
            probes = [Probe(sock, i) for i, sock in enumerate(probe_socks)]
            for probe in probes:
                probe.start()
            time.sleep(0.2)
            on_b = take(hosts.b, a_ip, secret, True, procs)
            across = one_move(on_b, on_a, probes, count, timeout)
            time.sleep(0.2)
            on_b2 = take(hosts.b, b_ip, secret, False, procs)
            here = one_move(on_b2, on_b, probes, count, timeout)
            time.sleep(0.2)
            for probe in probes:
                probe.stopping.set()
                probe.join(10)
            errors = [p.error for p in probes if p.error]
            assert not errors, errors
            for sock in idle:
                sock.sendall(b"again\n")
            lost = sum(1 for sock in idle if sock.recv(16) != b"again\n")
            assert lost == 0, f"{lost} idle connections lost"
            return {"connections": count, "across": across, "here": here}
    finally:
        for probe in probes:
            probe.stopping.set()
        for sock in [*idle, *(p.sock for p in probes)]:
            sock.close()
        for proc in procs:
            proc.kill()


def render(data: dict[str, Any]) -> str:
    lines = [
        "# A move across hosts (TCP_REPAIR) against one on one host (SCM_RIGHTS), "
        "through the library",
        "",
        f"Produced by `{data['command']}` on {data['date']} "
        f"(commit {data['machine'].get('commit')}), "
        f"{data['repeats']} repeat(s). Kernel {os.uname().release}; "
        f"{data['machine'].get('cpu')}; Python {sys.version.split()[0]}.",
        "",
        "`examples/echo.py` on simulated host A, N idle connections and "
        f"{PROBES} probes (a line every ms each) from the client namespace; "
        "`takeover take --cross-host` in host B, then `takeover take` in host B "
        "from that process. *pause*: the recipient's `pause_ms`. *worst probe*: the "
        "longest echo of a probe line while the move ran (what a client felt). "
        "Median (min..max) over the repeats; ratios within each repeat.",
        "",
        "| N | across: pause ms | across: worst probe ms | one host: pause ms "
        "| one host: worst probe ms | pause across / one host | worst probe across / one host |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in data["sizes"]:
        runs = [r for r in data["results"] if r["connections"] == size]

        def col(side: str, key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [r[side][key] for r in runs]

        def ratio(key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [r["across"][key] / r["here"][key] for r in runs if r["here"][key]]

        lines.append(
            f"| {size:,} | {report.cell(col('across', 'pause_ms'), 1)} "
            f"| {report.cell(col('across', 'worst_probe_ms'), 1)} "
            f"| {report.cell(col('here', 'pause_ms'), 1)} "
            f"| {report.cell(col('here', 'worst_probe_ms'), 1)} "
            f"| {report.cell(ratio('pause_ms'), 2)} | {report.cell(ratio('worst_probe_ms'), 2)} |"
        )
    lines += [
        "",
        "Every idle connection echoed a line after both moves, and every probe line "
        "came back once and in order (a run that loses one fails).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="crosshost-move")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory")
    parser.add_argument("--command", default="")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    args = parser.parse_args()
    tcprepair.require_capability()
    sizes = [int(n) for n in args.sizes.split(",")]
    _common.nofile_for(max(sizes) + 2 * _common.FD_MARGIN)
    data: dict[str, Any] = {**_common.run_header("crosshost-move", args), "sizes": sizes}
    data["results"] = []
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for size in sizes:
                _common.wait_quiet(args.quiet_wait)
                result = measure(size, workdir)
                data["results"].append(result)
                print(
                    f"N={size} repeat {repeat + 1}/{args.repeats}: across {result['across']}, "
                    f"one host {result['here']}",
                    flush=True,
                )
    path = os.path.join(args.out, args.name)
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(render(data))
    print(f"written to {path}.md")


if __name__ == "__main__":
    main()
