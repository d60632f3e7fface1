"""SCM_RIGHTS over a real AF_UNIX socketpair: batches, order, close-on-exec, truncation."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import pytest

from takeover import ProtocolError
from takeover._core.fds import (
    SCM_MAX_FD,
    ancillary,
    ancillary_space,
    batches,
    close_all,
    recv_with_fds,
    send_with_fds,
)

# Linux's value; PyPy's socket module lacks the constant.
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected AF_UNIX stream socketpair (sender, receiver)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    """A factory's worth of distinct open files (memfds), closed at the end."""
    opened: list[int] = []
    yield opened
    close_all(opened)


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_memfds(opened: list[int], count: int) -> list[int]:
    fds = [os.memfd_create(f"tk{i}") for i in range(count)]
    opened.extend(fds)
    return fds


def receive_all(sock: socket.socket, nbytes: int) -> tuple[bytes, list[int]]:
    """Read ``nbytes`` bytes with recv_with_fds, collecting every descriptor."""
    data = b""
    fds: list[int] = []
    while len(data) < nbytes:
        chunk, got = recv_with_fds(sock, 4096)
        assert chunk, "the sender closed early"
        data += chunk
        fds += got
    return data, fds


def test_six_hundred_fds_arrive_in_order_and_are_the_same_files(pair, memfds):
    """600 descriptors sent in batches of at most 253 arrive in order, each the same open file."""
    sender, receiver = pair
    originals = make_memfds(memfds, 600)
    parts = batches(originals)
    assert [len(b) for b in parts] == [253, 253, 94]
    for index, batch in enumerate(parts):
        assert send_with_fds(sender, bytes([65 + index]) * 10, batch) == 10
    data, received = receive_all(receiver, 30)
    memfds.extend(received)
    assert data == b"A" * 10 + b"B" * 10 + b"C" * 10
    assert len(received) == 600
    assert not set(received) & set(originals)
    for original, fd in zip(originals, received):
        mine, theirs = os.fstat(original), os.fstat(fd)
        assert (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    # Write through each received descriptor, read through the original one.
    for number, fd in enumerate(received):
        os.write(fd, f"file {number}".encode())
    for number, original in enumerate(originals):
        assert os.pread(original, 64, 0) == f"file {number}".encode()


def test_received_fds_are_close_on_exec(pair, memfds):
    """Descriptors come in with FD_CLOEXEC set, even when sent inheritable."""
    sender, receiver = pair
    originals = make_memfds(memfds, 5)
    for fd in originals:
        os.set_inheritable(fd, True)
    send_with_fds(sender, b"x", originals)
    data, received = recv_with_fds(receiver, 16)
    memfds.extend(received)
    assert data == b"x"
    assert len(received) == 5
    assert all(os.get_inheritable(fd) is False for fd in received)
    assert all(os.get_inheritable(fd) is True for fd in originals)


def test_fds_ride_on_the_first_byte(pair, memfds):
    """A batch is delivered with the first byte it was sent on, not later."""
    sender, receiver = pair
    originals = make_memfds(memfds, 3)
    send_with_fds(sender, b"hello", originals)
    data, received = recv_with_fds(receiver, 1)
    memfds.extend(received)
    assert data == b"h"
    assert len(received) == 3
    rest, more = recv_with_fds(receiver, 100)
    assert (rest, more) == (b"ello", [])


def test_batches_are_not_merged_in_one_read(pair, memfds):
    """Two batches sent back to back come out of two reads, in order, never merged."""
    sender, receiver = pair
    first, second = make_memfds(memfds, 2), make_memfds(memfds, 3)
    send_with_fds(sender, b"1", first)
    send_with_fds(sender, b"2", second)
    data1, got1 = recv_with_fds(receiver, 100)
    data2, got2 = recv_with_fds(receiver, 100)
    memfds.extend(got1 + got2)
    assert (data1, len(got1)) == (b"1", 2)
    assert (data2, len(got2)) == (b"2", 3)
    assert os.fstat(got2[0]).st_ino == os.fstat(second[0]).st_ino


def test_truncated_ancillary_data_closes_what_arrived_and_raises(pair, memfds):
    """MSG_CTRUNC: the descriptors that fit are closed and ProtocolError is raised."""
    sender, receiver = pair
    # recv_with_fds always leaves room for 253 descriptors, so a plain sender
    # cannot overflow it. SO_PASSCRED makes the kernel put an SCM_CREDENTIALS
    # message first in the same buffer; a full batch of 253 then no longer fits
    # and the kernel sets MSG_CTRUNC (246 descriptors arrive, 7 are dropped).
    receiver.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
    originals = make_memfds(memfds, SCM_MAX_FD)
    send_with_fds(sender, b"x", originals)
    before = open_count()
    with pytest.raises(ProtocolError, match=r"truncated \(MSG_CTRUNC\)"):
        recv_with_fds(receiver, 16)
    assert open_count() == before
    # The sender's copies are untouched.
    assert len({os.fstat(fd).st_ino for fd in originals}) == SCM_MAX_FD


def test_foreign_ancillary_data_closes_descriptors_and_raises(pair, memfds):
    """Ancillary data other than SCM_RIGHTS is refused and the descriptors beside it closed."""
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
    send_with_fds(sender, b"x", make_memfds(memfds, 4))
    before = open_count()
    with pytest.raises(ProtocolError, match="not SCM_RIGHTS"):
        recv_with_fds(receiver, 16)
    assert open_count() == before


def test_kernel_refuses_more_than_scm_max_fd(pair, memfds):
    """Linux refuses 254 descriptors in one message: the reason for batches of 253."""
    sender, _ = pair
    fds = make_memfds(memfds, SCM_MAX_FD + 1)
    payload = array.array("i", fds).tobytes()
    with pytest.raises(OSError):
        sender.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, payload)])


def test_recv_without_fds_returns_plain_data(pair):
    """Data sent without descriptors comes back with an empty descriptor list."""
    sender, receiver = pair
    sender.sendall(b"plain")
    assert recv_with_fds(receiver, 100) == (b"plain", [])


def test_recv_at_eof_returns_empty(pair):
    """After the peer closes, recv_with_fds returns no data and no descriptors."""
    sender, receiver = pair
    sender.close()
    assert recv_with_fds(receiver, 100) == (b"", [])


def test_recv_on_empty_nonblocking_socket_raises_blocking(pair):
    """A non-blocking socket with nothing queued raises BlockingIOError."""
    _, receiver = pair
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_with_fds(receiver, 100)


def test_send_with_fds_needs_a_byte(pair, memfds):
    """Descriptors cannot be sent on zero bytes of data."""
    sender, _ = pair
    with pytest.raises(ValueError, match="at least one byte"):
        send_with_fds(sender, b"", make_memfds(memfds, 1))


def test_send_with_no_fds_sends_plain_data(pair):
    """send_with_fds with an empty list sends the data alone."""
    sender, receiver = pair
    assert send_with_fds(sender, b"abc", []) == 3
    assert recv_with_fds(receiver, 10) == (b"abc", [])


def test_batches_edge_cases():
    """batches() splits in order at 253 by default and never yields an empty batch."""
    assert batches([]) == []
    assert batches([7]) == [[7]]
    assert batches(list(range(253))) == [list(range(253))]
    assert batches(list(range(254))) == [list(range(253)), [253]]
    assert batches(list(range(506))) == [list(range(253)), list(range(253, 506))]
    assert batches((5, 6, 7), size=1) == [[5], [6], [7]]
    assert batches(range(5), size=2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("size", [0, -1, SCM_MAX_FD + 1])
def test_batches_refuses_impossible_sizes(size):
    """A batch size outside 1..253 is a ValueError."""
    with pytest.raises(ValueError, match="batch size must be between 1 and 253"):
        batches([1, 2, 3], size)


def test_ancillary_limits():
    """ancillary() is empty for no descriptors and refuses more than 253."""
    assert ancillary([]) == []
    ((level, kind, data),) = ancillary([3, 4])
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    assert list(array.array("i", data)) == [3, 4]
    with pytest.raises(ValueError, match="at most 253"):
        ancillary(list(range(SCM_MAX_FD + 1)))


def test_ancillary_space_fits_a_full_batch():
    """The receive buffer holds exactly one full batch's control message."""
    assert ancillary_space() == socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
    assert ancillary_space(1) < ancillary_space()


def test_close_all_ignores_already_closed():
    """close_all closes what is open and skips descriptors already closed."""
    r, w = os.pipe()
    os.close(r)
    close_all([r, w, r])
    with pytest.raises(OSError):
        os.fstat(w)
