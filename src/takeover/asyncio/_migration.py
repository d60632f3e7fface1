"""The migration server: where a process publishes its services for recipients.

A :class:`MigrationServer` listens on a control socket (an AF_UNIX path, or
``tcp:HOST:PORT``) and holds each recipient's conversation with the core's
originator (``takeover._core.originator.serve_channel``). A recipient that
took every service renames its own socket over the path of the process it
replaced, so the next ``takeover take`` finds it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from .._core.auth import Admission, TLSConfig, group_name, user_name
from .._core.channel import Channel
from .._core.errors import AuthenticationError, ChannelClosedError, TakeoverError
from .._core.originator import serve_channel
from .._core.protocol import Limits
from .._core.registry import Registry, Service
from ._channel import AsyncioChannel, StreamChannel, parse_control

log = logging.getLogger("takeover.asyncio")


def _bind_control(path: str, admission: Admission, backlog: int = 64) -> socket.socket:
    """A listening AF_UNIX socket at ``path``, mode 0600 from the start.

    With ``admission``, the file's group and mode are set (see
    :meth:`Admission.socket_mode`) before the socket listens: until then a
    connect() is refused, so no one connects through a mode about to change.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        mode, group = admission.socket_mode()
        if group is not None:
            try:
                os.chown(path, -1, group)
            except PermissionError as exc:
                raise PermissionError(
                    exc.errno,
                    f"cannot give the control socket {path} to group {group_name(group)} "
                    "(--admit-group): only root or a member of the group can",
                ) from None
        if mode != 0o600:
            os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _path_lock(path: str) -> Iterator[None]:
    """Serialize renames onto ``path`` with the check-and-unlink of its owner.

    A recipient renames its socket over the control path while the process it
    replaced may be closing and removing that same path if the inode is still
    its own. Both steps hold an exclusive flock on the parent directory, so a
    rename can't land between the other's ``stat`` and ``unlink``.
    """
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale(path: str) -> None:
    """Remove a socket file at ``path`` that nothing listens on any more.

    Raises:
        FileExistsError: a migration server is listening there, or the path
            is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; choose another control path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("removing stale control socket %s", path)
            os.unlink(path)
            return
    raise FileExistsError(
        f"a migration server is already listening at {path}; "
        "take its services with `takeover take` or choose another control path"
    )


def check_publishable(control: str, *, replace: bool) -> None:
    """Refuse to take services that this process could not publish again.

    A recipient publishes what it took next to ``control``: renamed over it
    when it took everything (``replace``), else at a path of its own in the
    same directory. A recipient of another user than the originator's may
    lack the right to, and would then hold services nobody can take from it
    again; this says so before anything moves.

    Raises:
        TakeoverError: the directory does not let this user create (or lock)
            files, or, sticky like /tmp, does not let it rename over a
            control socket of another user.
    """
    kind, _ = parse_control(control)
    if kind != "unix":
        return
    path = os.path.abspath(control)
    directory = os.path.dirname(path)
    uid = os.geteuid()
    who = f"uid {uid} ({user_name(uid)})"
    effective = os.access in os.supports_effective_ids
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK, effective_ids=effective):
        raise TakeoverError(
            f"this process ({who}) could not publish the services again at {path}: it may "
            f"not create files in {directory}; nothing was taken. The control socket's "
            "directory must let the recipient's user read and create files in it "
            f"(e.g. `install -d -o {user_name(uid)} -m 0755 {directory}`)"
        )
    info = os.stat(directory)
    if replace and info.st_mode & stat.S_ISVTX and uid not in (0, info.st_uid):
        try:
            owner = os.lstat(path).st_uid
        except FileNotFoundError:
            return
        if owner != uid:
            raise TakeoverError(
                f"this process ({who}) could not publish the services again at {path}: "
                f"{directory} is sticky (like /tmp) and the socket there belongs to uid "
                f"{owner} ({user_name(owner)}), so this user may not rename over it; "
                "nothing was taken. Use a control directory that the recipient's user owns "
                "or may write to, without the sticky bit"
            )


class MigrationServer:
    """Publishes services for migration on a control socket.

    Args:
        control: an AF_UNIX socket path, or ``tcp:HOST:PORT``. A path is
            created with mode 0600 (see ``admit_users`` for other users) and
            every peer is checked with SO_PEERCRED (same user, or root, or
            admitted). Over TCP a ``secret`` or ``tls`` is mandatory, and
            descriptors still only move to a process on this host.
        limits: frame size, descriptor count and step timeout limits.
        replace: for a path, bind a temporary path and ``rename`` it over
            ``control`` (how a recipient takes over the control path of the
            process it replaced); for TCP, retry binding the port until the
            previous owner has released it. Otherwise a live server already
            at ``control`` is an error (a stale socket file is replaced).
        secret: a shared secret every recipient must prove it knows
            (mutual HMAC-SHA256 challenge-response); see :func:`load_secret`.
        tls: certificates for TLS over TCP; recipients must present one
            signed by ``tls.ca``.
        admit_users: other users (names or uids) whose processes may take
            services from here: their SO_PEERCRED uid is accepted. The
            control socket file is then mode 0666; the peer check is the
            gate (the directory's mode may narrow who reaches it).
        admit_groups: groups (names or gids): a peer whose primary or
            supplementary group is one of them is accepted. With exactly one
            group and no user, the socket file goes to that group, mode
            0660. Either way nothing of a service is sent before the check.
        release_address: the shell command that gives up the service
            address at the commit of a move to another host (see
            docs/crosshost.md); None: the address moves some other way.

    Raises:
        ValueError: a user or group name that this system does not know.
    """

    def __init__(
        self,
        control: str,
        *,
        limits: Limits = Limits(),
        replace: bool = False,
        secret: bytes | None = None,
        tls: TLSConfig | None = None,
        admit_users: Iterable[int | str] = (),
        admit_groups: Iterable[int | str] = (),
        release_address: str | None = None,
    ) -> None:
        self.admission = Admission.of(admit_users, admit_groups)
        self._kind, address = parse_control(control)
        if self._kind == "tcp" and secret is None and tls is None:
            raise AuthenticationError(
                f"a TCP control channel ({control}) needs a shared secret or TLS"
            )
        self._address = address
        self.path = os.path.abspath(control) if self._kind == "unix" else control
        self.limits = limits
        self.secret = secret
        self.tls = tls
        self.registry = Registry()
        self.registry.release_address = release_address
        self._replace = replace
        self._sock: socket.socket | None = None
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._empty: asyncio.Event | None = None

    async def __aenter__(self) -> MigrationServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the control socket and begin accepting recipients."""
        self._loop = asyncio.get_running_loop()
        self._empty = asyncio.Event()
        if self._kind == "tcp":
            await self._start_tcp()
            return
        if self._replace:
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            self._sock = _bind_control(temporary, self.admission)
            with _path_lock(self.path):
                os.rename(temporary, self.path)
        else:
            with _path_lock(self.path):
                _remove_stale(self.path)
                self._sock = _bind_control(self.path, self.admission)
        self._inode = os.stat(self.path).st_ino
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        log.info("migration server listening on %s", self.path)

    async def _start_tcp(self) -> None:
        host, port = self._address
        context = self.tls.context(server=True) if self.tls is not None else None
        deadline = None if self.limits.step_timeout is None else self.limits.step_timeout
        waited = 0.0
        while True:
            try:
                self._server = await asyncio.start_server(
                    self._serve_stream, host, port, ssl=context, reuse_address=True
                )
                break
            except OSError as exc:
                # The process this one replaces releases the port when its
                # last conversation ends.
                if not self._replace or exc.errno != errno.EADDRINUSE:
                    raise
                if deadline is not None and waited >= deadline:
                    raise
                await asyncio.sleep(0.05)
                waited += 0.05
        bound = self._server.sockets[0].getsockname()
        self.path = f"tcp:{host}:{bound[1]}"
        log.info("migration server listening on %s", self.path)

    def publish(self, service: Service) -> None:
        """Make ``service`` available to recipients."""
        self.registry.publish(service)

    async def wait_empty(self) -> None:
        """Return once every published service has moved away (or none is left)."""
        assert self._empty is not None, "start() the migration server first"
        self.registry.when_empty(self._empty.set)
        await self._empty.wait()
        # Let the conversation that moved the last service finish cleanly
        # (the recipient publishes the services again before it says BYE).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.limits.step_timeout)

    def _accept_ready(self) -> None:
        assert self._sock is not None and self._loop is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("migration server accept failed: %s", exc)
                return
            self._track(self._converse(AsyncioChannel(conn, self._loop, limits=self.limits)))

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        channel = StreamChannel(reader, writer, limits=self.limits, admission=self.admission)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._converse(channel)

    def _track(self, coroutine: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _converse(self, channel: Channel) -> None:
        try:
            await serve_channel(
                channel,
                self.registry,
                limits=self.limits,
                secret=self.secret,
                admission=self.admission,
            )
        except ChannelClosedError:
            pass
        except TakeoverError as exc:
            log.warning("control connection ended: %s", exc)
        except Exception:
            log.exception("control connection failed")
        finally:
            channel.close()

    async def aclose(self) -> None:
        """Stop accepting recipients and remove the control path if still ours."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            # Another process may have renamed its own socket over the path.
            with _path_lock(self.path), contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        current = asyncio.current_task()
        pending = [task for task in self._tasks if task is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
