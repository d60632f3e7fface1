"""takeover: move live network services between running Python processes.

The runtimes live in :mod:`takeover.asyncio` and :mod:`takeover.twisted`;
this package exports what they share: the errors, the registry and the
recipient's result type.
"""

from ._errors import (
    AuthenticationError,
    ChannelClosedError,
    MigrationRefusedError,
    MigrationTimeoutError,
    NoSuchServiceError,
    ProtocolError,
    SerializationError,
    ServiceBusyError,
    TakeoverError,
)
from ._options import add_control_options, control_options
from ._policy import UnpicklePolicy
from ._protocol import Limits
from ._retire import retire
from .recipient import Taken
from .registry import Registry, Service, ServiceState

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ChannelClosedError",
    "Limits",
    "MigrationRefusedError",
    "MigrationTimeoutError",
    "NoSuchServiceError",
    "ProtocolError",
    "Registry",
    "SerializationError",
    "Service",
    "ServiceBusyError",
    "ServiceState",
    "Taken",
    "TakeoverError",
    "UnpicklePolicy",
    "__version__",
    "add_control_options",
    "control_options",
    "retire",
]
