"""Pickling service graphs: sockets as descriptor slots, modules by name, __main__ scripts."""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from takeover import MigrationRefusedError, ProtocolError, SerializationError
from takeover._core.ahead import SocketsAhead, build_sockets
from takeover._core.pickling import _socket_slot, dumps
from takeover._core.pickling import loads as strict_loads
from takeover._core.policy import UnpicklePolicy
from takeover._core.script import MAIN_ALIAS

# The classes of these tests live in this module and in throwaway tk_* modules,
# which a recipient must be told to allow (tests/test_policy.py tests the policy).
TEST_POLICY = UnpicklePolicy(allow=(__name__, "tk_vanishing", "tk_renamed", "tk_broken"))


def loads(blob: bytes, fds: list[int], **kwargs: Any) -> Any:
    """``pickling.loads`` allowing this module's classes."""
    return strict_loads(blob, fds, policy=TEST_POLICY, **kwargs)


PYTHON = sys.executable


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def dup_all(fds: list[int]) -> list[int]:
    """Fresh descriptors for the same sockets, as SCM_RIGHTS would deliver them."""
    return [os.dup(fd) for fd in fds]


class Holder:
    """A plain object in a graph (module level, so it pickles by reference)."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    """A connected socketpair and a listening TCP socket, closed at the end."""
    a, b = socket.socketpair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    made = {"a": a, "b": b, "listener": listener}
    yield made
    for sock in made.values():
        sock.close()


@pytest.fixture
def module_dir(tmp_path, monkeypatch) -> Iterator[str]:
    """A directory on sys.path for throwaway modules, forgotten again at the end."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield str(tmp_path)
    for name in set(sys.modules) - before:
        if name.startswith("tk_"):
            del sys.modules[name]


def test_graph_with_sockets_loads_into_working_sockets(sockets):
    """Sockets become slots; loaded around fresh descriptors they carry data and accept."""
    graph = Holder(pair=(sockets["a"], sockets["b"]), listener=sockets["listener"], n=42)
    dumped = dumps(graph)
    assert dumped.sockets == [sockets["a"], sockets["b"], sockets["listener"]]
    assert dumped.fds == [s.fileno() for s in dumped.sockets]
    fresh = dup_all(dumped.fds)
    loaded = loads(dumped.blob, fresh)
    a, b = loaded.pair
    listener = loaded.listener
    try:
        assert loaded.n == 42
        assert [a.fileno(), b.fileno(), listener.fileno()] == fresh
        assert (a.family, a.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
        assert (listener.family, listener.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert listener.getsockname() == sockets["listener"].getsockname()
        a.sendall(b"through the copy")
        assert sockets["b"].recv(100) == b"through the copy"
        sockets["a"].sendall(b"to the copy")
        assert b.recv(100) == b"to the copy"
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"accepted")
                assert conn.recv(100) == b"accepted"
    finally:
        for sock in (a, b, listener):
            sock.close()


def test_same_socket_twice_is_one_slot(sockets):
    """A socket referenced from several places travels once and loads as one object."""
    a = sockets["a"]
    graph = [a, {"again": a}, Holder(sock=a), sockets["b"]]
    dumped = dumps(graph)
    assert dumped.sockets == [a, sockets["b"]]
    loaded = loads(dumped.blob, dup_all(dumped.fds))
    try:
        assert loaded[0] is loaded[1]["again"] is loaded[2].sock
        assert loaded[0] is not loaded[3]
    finally:
        loaded[0].close()
        loaded[3].close()


def test_unused_descriptors_are_closed_on_load(sockets):
    """A descriptor the graph does not refer to is closed by loads, not leaked."""
    dumped = dumps({"a": sockets["a"]})
    fresh = dup_all([*dumped.fds, sockets["b"].fileno()])
    loaded = loads(dumped.blob, fresh)
    try:
        with pytest.raises(OSError):
            os.fstat(fresh[1])
    finally:
        loaded["a"].close()


def test_closed_socket_refused():
    """A closed socket in the graph is a SerializationError, not a slot of -1."""
    sock = socket.socket()
    sock.close()
    with pytest.raises(SerializationError, match="closed socket"):
        dumps([sock])


def test_modules_pickle_by_name():
    """A module in the graph travels as its name and loads as the imported module."""
    graph = {"codec": json, "holder": Holder(mod=os.path)}
    if sys.implementation.name == "pypy":
        # PyPy's pickle makes a module a call of __import__, which recipients refuse.
        assert b"__import__" in pickle.dumps(graph)
    else:
        with pytest.raises(TypeError):
            pickle.dumps(graph)
    dumped = dumps(graph)
    assert dumped.sockets == []
    assert b"json" in dumped.blob
    assert len(dumped.blob) < 500
    loaded = loads(dumped.blob, [])
    assert loaded["codec"] is json
    assert loaded["holder"].mod is os.path


def make_module(directory: str, name: str, source: str) -> Any:
    """Write and import a module ``name`` in ``directory``."""
    with open(os.path.join(directory, f"{name}.py"), "w") as f:
        f.write(textwrap.dedent(source))
    __import__(name)
    return sys.modules[name]


def forget_module(directory: str, name: str) -> None:
    """Make ``name`` unimportable from now on."""
    os.unlink(os.path.join(directory, f"{name}.py"))
    del sys.modules[name]
    importlib.invalidate_caches()


@pytest.mark.parametrize("sockets_first", [True, False])
def test_unimportable_class_refused_naming_it_and_closing_fds(module_dir, sockets, sockets_first):
    """A class whose module is gone on load is refused by name; every descriptor is closed."""
    module = make_module(module_dir, "tk_vanishing", "class Protocol:\n    pass\n")
    thing = module.Protocol()
    socks = [sockets["a"], sockets["b"], sockets["listener"]]
    graph = [*socks, thing] if sockets_first else [thing, *socks]
    dumped = dumps(graph)
    forget_module(module_dir, "tk_vanishing")
    before = open_count()
    fresh = dup_all(dumped.fds)
    assert open_count() == before + 3
    with pytest.raises(MigrationRefusedError, match=r"cannot import tk_vanishing\.Protocol"):
        loads(dumped.blob, fresh)
    assert open_count() == before
    for fd in fresh:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_missing_attribute_refused_naming_it(module_dir):
    """A class renamed or removed from an importable module is refused by name."""
    module = make_module(module_dir, "tk_renamed", "class Old:\n    pass\n")
    dumped = dumps(module.Old())
    del module.Old
    with pytest.raises(MigrationRefusedError, match=r"tk_renamed\.Old"):
        loads(dumped.blob, [])


def test_error_in_setstate_refused_and_fds_closed(module_dir, sockets):
    """An exception raised while rebuilding an object refuses the graph and closes descriptors."""
    module = make_module(
        module_dir,
        "tk_broken",
        """
        class Picky:
            def __setstate__(self, state):
                raise RuntimeError("state from an older version")
        """,
    )
    picky = module.Picky()
    picky.x = 1
    dumped = dumps([sockets["a"], picky])
    before = open_count()
    fresh = dup_all(dumped.fds)
    with pytest.raises(MigrationRefusedError, match="RuntimeError: state from an older version"):
        loads(dumped.blob, fresh)
    assert open_count() == before


def test_lambda_is_a_serialization_error():
    """A lambda in the graph raises SerializationError (a TypeError) naming it."""
    with pytest.raises(SerializationError, match="lambda") as info:
        dumps(Holder(on_done=lambda: None))
    assert isinstance(info.value, TypeError)


def test_lock_is_a_serialization_error(sockets):
    """A threading.Lock in the graph raises SerializationError naming its type."""
    with pytest.raises(SerializationError, match=r"_thread\.lock"):
        dumps([sockets["a"], Holder(lock=threading.Lock())])


def test_tls_socket_is_a_serialization_error():
    """A TLS socket is refused, not sent as a bare fd whose session stays behind."""
    a, b = socket.socketpair()
    context = ssl.create_default_context()
    tls = context.wrap_socket(a, server_hostname="example", do_handshake_on_connect=False)
    with tls, b, pytest.raises(SerializationError, match="TLS socket"):
        dumps(Holder(conn=tls))


def test_generator_is_a_serialization_error():
    """A generator in the graph raises SerializationError."""
    with pytest.raises(SerializationError, match="generator"):
        dumps({"gen": (i for i in range(3))})


class _SlotPickler(pickle.Pickler):
    """Writes whatever persistent id it is told to for the object ``marker``."""

    def __init__(self, file: io.BytesIO, marker: object, pid: Any) -> None:
        super().__init__(file)
        self.marker, self.pid = marker, pid

    def persistent_id(self, obj: Any) -> Any:
        return self.pid if obj is self.marker else None


def forged(pid: Any) -> bytes:
    marker = object()
    buffer = io.BytesIO()
    _SlotPickler(buffer, marker, pid).dump([marker])
    return buffer.getvalue()


def test_slot_beyond_the_descriptors_refused_and_fds_closed(sockets):
    """A graph naming a descriptor slot that did not arrive is a ProtocolError; fds are closed."""
    slot = copyreg_call(_socket_slot, (3, int(socket.AF_UNIX), int(socket.SOCK_STREAM), 0))
    blob = pickle.dumps([slot], pickle.HIGHEST_PROTOCOL)
    before = open_count()
    fresh = dup_all([sockets["a"].fileno()])
    with pytest.raises(ProtocolError, match="slot 3, only 1 arrived"):
        loads(blob, fresh)
    assert open_count() == before


@pytest.mark.parametrize("pid", ["socket", ("file", 0), ("socket", 0, 1, 1, 0)])
def test_persistent_references_refused(pid):
    """A graph carries no persistent ids (sockets are slots): any is a ProtocolError."""
    with pytest.raises(ProtocolError, match="unknown persistent reference"):
        loads(forged(pid), [])


def test_main_class_without_script_path_refused():
    """A graph referring to __main__ with no script path is refused with a clear reason."""
    blob = b"c__main__\nApp\n."
    with pytest.raises(MigrationRefusedError, match="__main__"):
        loads(blob, [])


def test_malformed_main_reference_refused():
    """A main reference that is neither ``path:`` nor ``module:`` is a ProtocolError."""
    with pytest.raises(ProtocolError, match="malformed main script reference"):
        loads(b"c__main__\nApp\n.", [], main="/no/kind/prefix.py")


APP = '''\
"""A script whose classes travel as __main__.X."""
import os
import sys

from takeover._core import pickling, script


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        return f"hello {self.name} from {type(self).__module__}"


MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main-ran")

if __name__ == "__main__":
    with open(MARKER, "a") as f:
        f.write("ran\\n")
    dumped = pickling.dumps({"greeter": Greeter("world")})
    with open(sys.argv[1], "wb") as f:
        f.write(dumped.blob)
    print(script.main_reference())
'''

LOADER = """\
import sys

from takeover._core import pickling, script

blob_in, main, blob_out = sys.argv[1:]
with open(blob_in, "rb") as f:
    graph = pickling.loads(f.read(), [], main=main)
greeter = graph["greeter"]
print(type(greeter).__module__, type(greeter).__qualname__)
print(greeter.greet())
print(script.main_reference())
with open(blob_out, "wb") as f:
    f.write(pickling.dumps(graph).blob)
"""


def run(*argv: str, cwd: str) -> list[str]:
    done = subprocess.run(
        [PYTHON, *argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_script_classes_load_in_another_process_as_takeover_main(tmp_path):
    """A graph from ``python app.py`` loads elsewhere as __takeover_main__; main block not run."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    app = app_dir / "app.py"
    app.write_text(APP)
    loader = tmp_path / "loader.py"
    loader.write_text(LOADER)
    blob1, blob2, blob3 = (str(tmp_path / f"graph{i}.pickle") for i in (1, 2, 3))
    marker = app_dir / "main-ran"

    # A: the script itself pickles its own class as __main__.Greeter.
    (reference,) = run(str(app), blob1, cwd=str(tmp_path))
    assert reference == f"path:{app}"
    with open(blob1, "rb") as f:
        assert b"__main__" in f.read()
    assert marker.read_text() == "ran\n"

    # B: another program loads the script under the alias; its main block stays quiet.
    lines = run(str(loader), blob1, reference, blob2, cwd=str(tmp_path))
    assert lines == [f"{MAIN_ALIAS} Greeter", f"hello world from {MAIN_ALIAS}", reference]
    assert marker.read_text() == "ran\n"
    with open(blob2, "rb") as f:
        assert MAIN_ALIAS.encode() in f.read()

    # C: a graph that already moved once moves again (A -> B -> C).
    lines = run(str(loader), blob2, reference, blob3, cwd=str(tmp_path))
    assert lines == [f"{MAIN_ALIAS} Greeter", f"hello world from {MAIN_ALIAS}", reference]
    assert marker.read_text() == "ran\n"


def test_script_run_as_module_loads_by_module_name(tmp_path):
    """A graph from ``python -m tk_app`` loads elsewhere by importing tk_app; main block not run."""
    (tmp_path / "tk_app.py").write_text(APP)
    (tmp_path / "loader.py").write_text(LOADER)
    blob1, blob2 = str(tmp_path / "graph1.pickle"), str(tmp_path / "graph2.pickle")
    marker = tmp_path / "main-ran"

    (reference,) = run("-m", "tk_app", blob1, cwd=str(tmp_path))
    assert reference == "module:tk_app"
    assert marker.read_text() == "ran\n"

    lines = run(str(tmp_path / "loader.py"), blob1, reference, blob2, cwd=str(tmp_path))
    assert lines[:2] == ["tk_app Greeter", "hello world from tk_app"]
    assert marker.read_text() == "ran\n"


# -- sockets sent ahead of the graph ------------------------------------------------


def send_ahead(sent_ahead: SocketsAhead) -> list[socket.socket]:
    """What a recipient builds from the batches an originator sends ahead."""
    built: list[socket.socket] = []
    for batch, kinds in sent_ahead.batches(2):  # small batches: kinds split across them
        built.extend(build_sockets(dup_all(batch), kinds))
    return built


def test_sockets_sent_ahead_keep_their_slots_and_new_ones_follow(sockets):
    """The dry run's sockets go ahead; one closed since is dropped, one opened since follows."""
    a, b, listener = sockets["a"], sockets["b"], sockets["listener"]
    gone_a, gone_b = socket.socketpair()
    graph = Holder(a=a, b=b, gone=gone_a, listener=listener)
    sent_ahead = SocketsAhead(dumps(graph).sockets)
    stream = socket.SOCK_STREAM
    assert sent_ahead.kinds == [
        [3, socket.AF_UNIX, stream, 0, 0],
        [1, socket.AF_INET, stream, 0, 0],
    ]
    ahead = send_ahead(sent_ahead)
    # Meanwhile (the service still runs) one socket closes and another appears.
    graph.gone = None
    gone_a.close()
    gone_b.close()
    late_a, late_b = socket.socketpair()
    graph.late = late_a
    sent_ahead.forget_closed()
    before = open_count()
    dumped = dumps(graph, ahead=sent_ahead)
    assert dumped.sockets[:4] == sent_ahead.sockets and dumped.sockets[4:] == [late_a]
    loaded = loads(dumped.blob, dup_all([late_a.fileno()]), ahead=ahead)
    try:
        assert (loaded.a, loaded.b, loaded.listener) == (ahead[0], ahead[1], ahead[3])
        assert ahead[2].fileno() == -1  # sent ahead, then unused: closed by loads
        assert open_count() == before  # 1 dup arrived, 1 socket sent ahead was closed
        loaded.late.sendall(b"late")
        assert late_b.recv(10) == b"late"
        loaded.a.sendall(b"ahead")
        assert b.recv(10) == b"ahead"
        assert loaded.listener.gettimeout() == listener.gettimeout()
    finally:
        for sock in (*ahead, loaded.late, late_a, late_b):
            sock.close()


def test_socket_sent_ahead_closed_but_still_in_the_graph_refused(sockets):
    """A socket closed after going ahead cannot be referred to by slot any more."""
    a, b = socket.socketpair()
    graph = Holder(a=a, b=sockets["b"])
    sent_ahead = SocketsAhead(dumps(graph).sockets)
    a.close()
    b.close()
    sent_ahead.forget_closed()
    with pytest.raises(SerializationError, match="closed socket"):
        dumps(graph, ahead=sent_ahead)


def test_socket_slot_sent_ahead_used_twice_refused_and_all_closed(sockets):
    """A graph naming one slot sent ahead twice is refused; every socket is closed."""
    sent_ahead = SocketsAhead([sockets["a"], sockets["b"]])
    ahead = send_ahead(sent_ahead)
    reduction = sent_ahead.reductions[sockets["a"]]

    blob = pickle.dumps(
        [copyreg_call(*reduction), copyreg_call(*reduction)], pickle.HIGHEST_PROTOCOL
    )
    with pytest.raises(ProtocolError, match="slot 0 sent ahead"):
        loads(blob, [], ahead=ahead)
    assert [s.fileno() for s in ahead] == [-1, -1]


class copyreg_call:
    """Pickles as ``function(*args)``, as a separate object each time."""

    def __init__(self, function: Any, args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> Any:
        return (self.function, self.args)


def test_a_descriptor_that_is_no_socket_closes_the_whole_batch(sockets):
    """One descriptor of a batch sent ahead that cannot become a socket: the others are closed.

    (Malformed kinds never get here: the conversation refuses them, see
    test_protocol's test_each_batch_sent_ahead_is_described_by_its_kinds.)
    """
    fds = dup_all([sockets["a"].fileno(), sockets["b"].fileno()])
    os.close(fds[1])  # a number that is no descriptor (any interpreter refuses it)
    with pytest.raises(OSError):
        build_sockets(fds, [[2, socket.AF_UNIX, socket.SOCK_STREAM, 0, 0]])
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_non_blocking_socket_arrives_non_blocking(sockets):
    """SOCK_NONBLOCK travels in the type: the copy is non-blocking with no setblocking call."""
    a = sockets["a"]
    a.setblocking(False)
    dumped = dumps({"a": a, "b": sockets["b"]})
    loaded = loads(dumped.blob, dup_all(dumped.fds))
    try:
        assert loaded["a"].gettimeout() == 0.0
        assert loaded["a"].type == socket.SOCK_STREAM  # the flag is not part of .type
        assert loaded["b"].gettimeout() is None
    finally:
        loaded["a"].close()
        loaded["b"].close()
