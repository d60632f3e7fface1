"""Established TCP connections checkpointed and restored with TCP_REPAIR (Linux).

This is CRIU's soccr sequence (``soccr/soccr.c``) for one connection at a
time, for a move to another host where descriptors cannot travel:

* :func:`freeze` makes the kernel silent about some connections: a netfilter
  drop for each 4-tuple (an ``nft`` table of this process's, both directions,
  at raw priority, before conntrack), then TCP_REPAIR on each socket. Nothing
  the client sends reaches the socket, nothing the socket sends (an ACK, a
  window update, a retransmission, a FIN or RST on close) reaches the client.
* :func:`checkpoint` reads a frozen socket into plain data (builtins only, so
  that it travels in a pickled graph under the strict unpickling policy):
  addresses, both sequence numbers, both queues' bytes, the options the
  handshake negotiated (MSS, window scale, SACK, timestamps), the timestamp
  offset and the window.
* :func:`prepare` builds a socket from that state in repair mode: bound to the
  service's address, "connected" to the client without a SYN, its sequences,
  queues, options and window restored. It sends nothing. :func:`start` leaves
  repair mode and writes the bytes the originator had not sent yet;
  :func:`restore` is both.
* :meth:`Freeze.thaw` (rollback) leaves repair mode on the originator's
  sockets, still open, and lifts the drop; :meth:`Freeze.release` (commit)
  closes them, in repair mode, which sends neither FIN nor RST, and lifts the
  drop once the caller says the packets for those connections no longer come
  here (the service address has moved).

Needs CAP_NET_ADMIN in the socket's network namespace (:func:`require_capability`
refuses clearly without it) and, for :func:`freeze`, the ``nft`` command
(Debian's nftables).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from takeover._core.dropguard import nft as _nft
from takeover._core.dropguard import table_prefix
from takeover._core.errors import NotPermittedError
from takeover._core.errors import RepairError as RepairError  # where callers look for it

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
# linux/sockios.h
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
# tcp_info.tcpi_options
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
# TCP option kinds (TCP_REPAIR_OPTIONS)
TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
TCP_ESTABLISHED = 1
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_FREEBIND = 78
IPV6_TRANSPARENT = 75
CAP_NET_ADMIN = 12

STATE_VERSION = 1
_WINDOW = struct.Struct("=5I")
_INT = struct.Struct("=i")


class CapabilityError(RepairError, NotPermittedError):
    """This process may not repair TCP connections (no CAP_NET_ADMIN, no nft)."""

    code = "not-permitted"


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (effective), read from /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        return False
    return False


def require_capability(*, nft: bool = True) -> None:
    """Refuse, with the reason, a process that cannot move connections across hosts."""
    if not has_net_admin():
        raise CapabilityError(
            "moving TCP connections to another host needs CAP_NET_ADMIN (TCP_REPAIR, "
            f"netfilter): run as root, or grant the capability (this process, uid {os.geteuid()}, "
            "lacks it)",
        )
    if nft and shutil.which("nft") is None:
        raise CapabilityError(
            "moving TCP connections to another host needs the nft command "
            "(Debian's nftables) to keep the kernel silent about the connections while they move",
        )


def _address(family: int, addr: Any) -> list[Any]:
    return [addr[0], addr[1]] if family == socket.AF_INET else [addr[0], addr[1], 0, addr[3]]


def four_tuple(sock: socket.socket) -> tuple[int, list[Any], list[Any]]:
    """The family, local and peer addresses of a connected socket."""
    family = sock.family
    return family, _address(family, sock.getsockname()), _address(family, sock.getpeername())


def _setint(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _ioctl(sock: socket.socket, request: int) -> int:
    buf = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    return int(_INT.unpack(buf)[0])


def repair_on(sock: socket.socket) -> None:
    _setint(sock, TCP_REPAIR, TCP_REPAIR_ON)


def repair_off(sock: socket.socket) -> None:
    """Leave repair mode (the kernel then sends a window probe: the connection lives)."""
    _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    _setint(sock, TCP_REPAIR, TCP_REPAIR_OFF)


def _peek_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    _setint(sock, TCP_REPAIR_QUEUE, queue)
    seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
    data = b""
    if length:
        # One byte more than the kernel counts: it must not have more (soccr).
        data = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != length:
            raise RepairError(
                f"queue {queue}: {len(data)} bytes peeked, the kernel counts {length}"
            )
    return seq & 0xFFFFFFFF, data


def checkpoint(sock: socket.socket) -> dict[str, Any]:
    """The state of an established connection, which must be in repair mode.

    Builtins only: ints, strs, bytes, lists and a dict. Nothing is consumed:
    the socket still holds its queues (a rollback loses nothing).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    tcp_state, options, wscale = info[0], info[5], info[6]
    if tcp_state != TCP_ESTABLISHED:
        raise RepairError(
            "only established connections move across hosts (this one is in TCP "
            f"state {tcp_state}: half-closed connections need a forged FIN, which is not done)",
        )
    family, local, peer = four_tuple(sock)
    outq = _ioctl(sock, SIOCOUTQ)
    unsent = _ioctl(sock, SIOCOUTQNSD)
    inq = _ioctl(sock, SIOCINQ)
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "family": int(family),
        "local": local,
        "peer": peer,
        "mss": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
        "options": options,
        "snd_wscale": wscale & 0xF,
        "rcv_wscale": wscale >> 4,
        "timestamp": None,
        "window": None,
        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "unsent": unsent,
    }
    if options & TCPI_OPT_TIMESTAMPS:
        state["timestamp"] = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)
        state["window"] = list(_WINDOW.unpack(raw))
    except OSError as exc:  # before Linux 4.8
        if exc.errno != errno.ENOPROTOOPT:
            raise
    state["recv_seq"], state["recv_queue"] = _peek_queue(sock, TCP_RECV_QUEUE, inq)
    state["send_seq"], state["send_queue"] = _peek_queue(sock, TCP_SEND_QUEUE, outq)
    _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return state


def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write a queue's bytes in repair mode: the kernel makes one linear buffer per
    call, so a chunk too large for it fails with ENOMEM and is halved (soccr)."""
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError as exc:
            if exc.errno != errno.ENOMEM or chunk <= 1024:
                raise
            chunk //= 2
            continue
        view = view[sent:]


def _set_seq(sock: socket.socket, queue: int, seq: int) -> None:
    _setint(sock, TCP_REPAIR_QUEUE, queue)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", seq & 0xFFFFFFFF))


def _transparent(sock: socket.socket, family: int, value: int) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, value)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, value)


def prepare(state: dict[str, Any], *, freebind: bool = False) -> socket.socket:
    """A socket rebuilt from :func:`checkpoint`'s state, still in repair mode: it has
    sent nothing. ``freebind`` lets it bind and route from the service address
    before the address is this host's (IP_TRANSPARENT: IP_FREEBIND binds, but the
    route lookup of connect still wants a local source; :func:`start` clears it).
    :func:`start` brings it to life."""
    if state.get("version") != STATE_VERSION:
        raise RepairError(f"unknown TCP repair state version {state.get('version')}")
    family = state["family"]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Repair mode before bind: it forces the port's reuse next to the
        # listener. SO_REUSEADDR now would undo that (the bind then fails).
        repair_on(sock)
        if freebind:
            _transparent(sock, family, 1)
        sock.bind(tuple(state["local"]))
        recv_queue: bytes = state["recv_queue"]
        send_queue: bytes = state["send_queue"]
        # The kernel advances the sequence by what is written into each queue.
        _set_seq(sock, TCP_RECV_QUEUE, state["recv_seq"] - len(recv_queue))
        _set_seq(sock, TCP_SEND_QUEUE, state["send_seq"] - len(send_queue))
        sock.connect(tuple(state["peer"]))  # in repair mode: no SYN, ESTABLISHED at once
        options = state["options"]
        repair_options = []
        if options & TCPI_OPT_SACK:
            repair_options.append((TCPOPT_SACK_PERM, 0))
        if options & TCPI_OPT_WSCALE:
            repair_options.append(
                (TCPOPT_WINDOW, state["snd_wscale"] + (state["rcv_wscale"] << 16))
            )
        if options & TCPI_OPT_TIMESTAMPS:
            repair_options.append((TCPOPT_TIMESTAMP, 0))
        repair_options.append((TCPOPT_MAXSEG, state["mss"]))
        packed = b"".join(struct.pack("=II", code, value) for code, value in repair_options)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, packed)
        if state["timestamp"] is not None:
            # The originator's timestamp clock: without it the client's PAWS check
            # drops every segment this socket sends.
            sock.setsockopt(
                socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("=I", state["timestamp"])
            )
        if recv_queue:
            _setint(sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _send_all(sock, recv_queue)
        sent = len(send_queue) - state["unsent"]
        if sent:
            # Sent but not acknowledged: queued as sent, retransmitted by the kernel.
            _setint(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _send_all(sock, send_queue[:sent])
        if state["window"] is not None:
            # After the queues: before them the kernel answers EINVAL.
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.pack(*state["window"]))
        _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if state["nodelay"]:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if state["keepalive"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def unsent(state: dict[str, Any]) -> bytes:
    """The bytes the originator's kernel held but had never sent: written by
    :func:`start` as ordinary output once repair mode is left."""
    queue: bytes = state["send_queue"]
    return queue[len(queue) - state["unsent"] :]


def start(sock: socket.socket, state: dict[str, Any]) -> bytes:
    """Leave repair mode; return the never-sent bytes, which the caller writes
    first (a blocking socket: :func:`restore` writes them itself)."""
    repair_off(sock)
    if (
        sock.getsockopt(socket.IPPROTO_IP, IP_TRANSPARENT)
        if sock.family == socket.AF_INET
        else (sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT))
    ):
        _transparent(sock, sock.family, 0)
    return unsent(state)


def restore(state: dict[str, Any], *, freebind: bool = False) -> socket.socket:
    """:func:`prepare` and :func:`start`, the never-sent bytes written: a live,
    blocking socket."""
    sock = prepare(state, freebind=freebind)
    try:
        rest = start(sock, state)
        if rest:
            sock.sendall(rest)
    except BaseException:
        sock.close()
        raise
    return sock


# -- what else a move across hosts needs -----------------------------------------

SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)
_TCP_INFO_BACKLOG = struct.Struct("=24xII")  # tcpi_unacked, tcpi_sacked: a listener's queue


def _accept_queue(listener: socket.socket) -> tuple[int, int]:
    """A listener's accept queue: how many it holds, and its backlog (TCP_INFO)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BACKLOG.size)
    queued, backlog = _TCP_INFO_BACKLOG.unpack(info)
    return int(queued), int(backlog)


def listener_options(sock: socket.socket) -> tuple[int, dict[str, int]]:
    """A listening TCP socket's backlog and the options rebuilt with it."""
    _queued, backlog = _accept_queue(sock)
    options = {
        "reuseaddr": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15)),
    }
    if sock.family == socket.AF_INET6:
        options["v6only"] = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    return max(backlog, 1), options


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN))


_TCP_STATES = {
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    11: "CLOSING",
}


def cross_host_refusal(sock: socket.socket) -> str | None:
    """Why ``sock`` cannot move to another host (None: it can), naming it."""
    family, kind = int(sock.family), int(sock.type) & ~getattr(socket, "SOCK_NONBLOCK", 0)
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        try:
            name: Any = sock.getsockname()
        except OSError:
            name = "?"
        what = "a UNIX socket" if family == socket.AF_UNIX else "a socket that is not TCP"
        return (
            f"cannot move {what} ({name or 'unnamed'}, fd {sock.fileno()}) to another host: "
            "only TCP listeners and established TCP connections move across hosts"
        )
    if is_listening(sock):
        return None
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    if state != 1:  # TCP_ESTABLISHED
        try:
            peer: Any = sock.getpeername()
        except OSError:
            peer = "?"
        return (
            f"cannot move the connection from {peer} (fd {sock.fileno()}, TCP state "
            f"{_TCP_STATES.get(state, state)}) to another host: only established "
            "connections move across hosts (a half-closed one would need a forged FIN)"
        )
    return None


def listen_again(
    family: int, address: Sequence[Any], backlog: int, options: dict[str, int]
) -> socket.socket:
    """A listener bound with IP_FREEBIND (the address need not be this host's
    yet), with ``options`` (from :func:`listener_options`), listening, non-blocking."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if options.get("reuseaddr"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options.get("reuseport"):
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15), 1)
        if family == socket.AF_INET6:
            v6only = int(bool(options.get("v6only")))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind(tuple(address))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the drop ---------------------------------------------------------------------

_tables = itertools.count()


def _element(family: int, local: Sequence[Any], peer: Sequence[Any]) -> str:
    return f"{local[0]} . {local[1]} . {peer[0]} . {peer[1]}"


def _syn_rule(family: int, address: Sequence[Any]) -> str:
    """An nft rule dropping new connections (a SYN without ACK) to a listener."""
    host, port = address[0], int(address[1])
    syn = "tcp flags & (syn | ack) == syn drop"
    if family == socket.AF_INET:
        match = "" if host in ("", "0.0.0.0") else f"ip daddr {host} "
        return f"    meta nfproto ipv4 {match}tcp dport {port} {syn}"
    match = "" if host in ("", "::") else f"ip6 daddr {host} "
    return f"    meta nfproto ipv6 {match}tcp dport {port} {syn}"


def drop_script(
    table: str,
    connections: Iterable[tuple[int, list[Any], list[Any]]],
    listeners: Iterable[tuple[int, Sequence[Any]]] = (),
) -> str:
    """An nft table that drops every packet of these connections, both ways, and
    new connections to these listeners (family, address): their SYNs, which the
    clients send again (after a second) to whichever host then has the address."""
    lines = [f"table inet {table} {{"]
    for name, kind in (("v4", "ipv4_addr"), ("v6", "ipv6_addr")):
        lines.append(f"  set {name} {{ type {kind} . inet_service . {kind} . inet_service; }}")
    lines += [
        "  chain in { type filter hook prerouting priority -300; policy accept;",
        "    ip daddr . tcp dport . ip saddr . tcp sport @v4 drop",
        "    ip6 daddr . tcp dport . ip6 saddr . tcp sport @v6 drop",
        *(_syn_rule(family, address) for family, address in listeners),
        "  }",
        "  chain out { type filter hook output priority -300; policy accept;",
        "    ip saddr . tcp sport . ip daddr . tcp dport @v4 drop",
        "    ip6 saddr . tcp sport . ip6 daddr . tcp dport @v6 drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n" + add_script(table, connections)


def add_script(table: str, connections: Iterable[tuple[int, list[Any], list[Any]]]) -> str:
    """The nft commands that add connections to the sets of :func:`drop_script`'s table."""
    v4: list[str] = []
    v6: list[str] = []
    for family, local, peer in connections:
        (v4 if family == socket.AF_INET else v6).append(_element(family, local, peer))
    lines = []
    for name, elements in (("v4", v4), ("v6", v6)):
        if elements:
            lines.append(f"add element inet {table} {name} {{ {', '.join(elements)} }}\n")
    return "".join(lines)


class Freeze:
    """Connections the kernel is silent about: dropped both ways, in repair mode.

    Made by :func:`freeze`, or in two steps by a move: :meth:`drop` with the
    listeners only (the door closed to new connections while the service
    still accepts what is queued), then :meth:`add` with the connections.
    Exactly one of :meth:`thaw` (rollback: the sockets live again here) or
    :meth:`release` (commit: closed silently) ends it.
    """

    def __init__(
        self, sockets: Sequence[socket.socket], listeners: Sequence[socket.socket] = ()
    ) -> None:
        # Each socket with its 4-tuple, in the order frozen.
        self.sockets = {sock: four_tuple(sock) for sock in sockets}
        self.listeners = [(int(s.family), s.getsockname()) for s in listeners]
        self.table = f"{table_prefix()}{next(_tables)}"
        self.dropping = False
        self.repaired: dict[socket.socket, None] = {}

    def drop(self) -> None:
        """Drop every packet of these connections, both ways (one nft table)."""
        if (self.sockets or self.listeners) and not self.dropping:
            _nft(drop_script(self.table, self.sockets.values(), self.listeners))
            self.dropping = True

    def repair(self, sockets: Iterable[socket.socket] | None = None) -> None:
        """Put the sockets (default: every one) in repair mode (after :meth:`drop`:
        no ACK leaves)."""
        for sock in self.sockets if sockets is None else sockets:
            if sock not in self.repaired:
                repair_on(sock)
                self.repaired[sock] = None

    def add(self, sockets: Sequence[socket.socket]) -> None:
        """Freeze more connections in the same table: their drop, then repair mode."""
        new = {sock: four_tuple(sock) for sock in sockets if sock not in self.sockets}
        if not new:
            return
        if self.dropping:
            _nft(add_script(self.table, new.values()))
        self.sockets.update(new)
        if not self.dropping:
            self.drop()
        self.repair(new)

    def checkpoints(self) -> list[dict[str, Any]]:
        return [checkpoint(sock) for sock in self.sockets]

    def lift(self) -> None:
        """Remove the drop (idempotent)."""
        if self.dropping:
            _nft(f"delete table inet {self.table}\n")
            self.dropping = False

    def thaw(self) -> None:
        """Rollback: leave repair mode on every socket (still open), then lift the drop."""
        try:
            for sock in self.repaired:
                if sock.fileno() >= 0:
                    repair_off(sock)
            self.repaired.clear()
        finally:
            self.lift()

    def close_sockets(self) -> None:
        """Commit: close the sockets in repair mode (no FIN, no RST). The drop stays
        until :meth:`lift`: a packet for a closed connection would otherwise be
        answered with a RST while the service address is still here."""
        for sock in self.sockets:
            sock.close()
        self.repaired.clear()

    def release(self) -> None:
        self.close_sockets()
        self.lift()


def freeze(sockets: Sequence[socket.socket], listeners: Sequence[socket.socket] = ()) -> Freeze:
    """Drop every packet of these connections, both ways, then put each in repair
    mode; drop new connections to ``listeners`` too (see :func:`drop_script`)."""
    require_capability(nft=bool(sockets) or bool(listeners))
    frozen = Freeze(sockets, listeners)
    try:
        frozen.drop()
        frozen.repair()
    except BaseException:
        frozen.thaw()
        raise
    return frozen


def queued(listener: socket.socket) -> int:
    """How many connections the kernel has completed that ``listener`` has not
    accepted yet (its accept queue: TCP_INFO's tcpi_unacked on a listener)."""
    return _accept_queue(listener)[0]


# -- the service address's hooks ---------------------------------------------------

HOOK_TIMEOUT = 30.0


def run_address_hook(command: str | None, what: str) -> None:
    """Run an address hook (``sh -c COMMAND``): ``what`` says which ("release",
    "acquire"). None: nothing to run (the address is moved some other way).

    Raises:
        RepairError: it failed or timed out; the message has its stderr.
    """
    if not command:
        return
    try:
        done = subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, timeout=HOOK_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise RepairError(f"the {what} hook {command!r} ran over {HOOK_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise RepairError(f"the {what} hook {command!r} could not run: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise RepairError(f"the {what} hook {command!r} failed: {detail}")
