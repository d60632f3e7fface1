"""takeover: move live network services between running Python processes.

The runtimes live in :mod:`takeover.asyncio` and :mod:`takeover.twisted`;
this package exports what they share: the errors, the registry and the
recipient's result type. The machinery is in ``takeover._core``, which knows
no event loop (see docs/design.md).
"""

from ._core import errors as _errors
from ._core.errors import *  # noqa: F403  (the TakeoverError tree)
from ._core.options import add_control_options, control_options
from ._core.policy import UnpicklePolicy
from ._core.protocol import Limits
from ._core.recipient import Taken
from ._core.registry import Registry, Service, ServiceState
from ._core.retire import retire

__version__ = "0.1.0"

__all__ = [
    "Limits",
    "Registry",
    "Service",
    "ServiceState",
    "Taken",
    "UnpicklePolicy",
    "__version__",
    "add_control_options",
    "control_options",
    "retire",
]
__all__ += _errors.__all__
