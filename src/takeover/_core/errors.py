"""The exception tree.

Every error takeover raises derives from :class:`TakeoverError` and, where a
builtin means the same thing, from that builtin too, so that ``except
TimeoutError`` or ``except PermissionError`` keeps working. Errors travel
between processes (an originator tells a recipient why it refused), so each
one pickles: ``__reduce__`` rebuilds it from its message alone.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ChannelClosedError",
    "ConnectionMovedError",
    "MigrationRefusedError",
    "MigrationTimeoutError",
    "NoSuchServiceError",
    "ProtocolError",
    "RolledBackError",
    "SerializationError",
    "ServiceBusyError",
    "TakeoverError",
]


class TakeoverError(Exception):
    """Base class of every error raised by takeover.

    ``code`` is the short, stable name that travels in ERROR frames and that
    the command line prints; the message says what happened and what to do.
    """

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class ProtocolError(TakeoverError, ValueError):
    """The peer sent something the control protocol does not allow."""

    code = "protocol"


class ChannelClosedError(TakeoverError, ConnectionError):
    """The control channel closed before the conversation was over."""

    code = "closed"


class AuthenticationError(TakeoverError, PermissionError):
    """The peer could not be authenticated (credentials, secret)."""

    code = "permission"


class NoSuchServiceError(TakeoverError, LookupError):
    """The named service is not published by the originator."""

    code = "no-such-service"


class ServiceBusyError(TakeoverError):
    """The service is already in transit to another recipient."""

    code = "busy"


class SerializationError(TakeoverError, TypeError):
    """A service graph could not be pickled on the originator."""

    code = "unpicklable"


class MigrationRefusedError(TakeoverError):
    """The recipient could not rebuild or adopt the service graph."""

    code = "refused"


class RepairError(TakeoverError):
    """A connection could not be checkpointed, restored, frozen or thawed
    (a move across hosts, ``tcprepair``)."""

    code = "tcp-repair"


class MigrationTimeoutError(TakeoverError, TimeoutError):
    """A step of the conversation took longer than its timeout."""

    code = "timeout"


class RolledBackError(TakeoverError):
    """The originator rolled the move back before the recipient could commit.

    It gave up waiting (its step timeout, a broken channel) or code outside
    the service changed one of its connections after its graph was pickled
    (see :class:`ConnectionMovedError`); the message says which. The service
    goes on in the originator, and taking it again may succeed.
    """

    code = "rolled-back"


class ConnectionMovedError(TakeoverError, ConnectionError):
    """A write to a connection whose service has moved to another process.

    Raised, in the process the service left, by ``write()`` (and
    ``writelines()``, ``write_eof()``) on one of the service's transports
    once the recipient owns the connection; ``is_closing()`` is then true.
    Nothing of the call was sent: the bytes are the writer's to deal with.
    A ``ConnectionError``, so code that handles a lost connection on write
    handles this one too.
    """

    code = "moved"


class NotPermittedError(TakeoverError, PermissionError):
    """This process lacks a privilege the operation needs (CAP_NET_ADMIN for a
    move across hosts); the message says which."""

    code = "not-permitted"


ERRORS_BY_CODE: dict[str, type[TakeoverError]] = {
    cls.code: cls
    for cls in (
        TakeoverError,
        ProtocolError,
        ChannelClosedError,
        AuthenticationError,
        NoSuchServiceError,
        ServiceBusyError,
        SerializationError,
        MigrationRefusedError,
        MigrationTimeoutError,
        RolledBackError,
        ConnectionMovedError,
        NotPermittedError,
    )
}


def error_from_code(code: str, message: str) -> TakeoverError:
    """Rebuild the exception an ERROR frame describes."""
    return ERRORS_BY_CODE.get(code, TakeoverError)(message)
