"""prefork_server: pre-forked socket servers, supervised by a master process.

The public names; see the modules for the design.
"""

from .daemon import PidFileError
from .engine import Preforker
from .hooks import Hooks
from .master import BootError
from .server import (
    PreforkMixIn,
    PreforkTCPServer,
    PreforkThreadingMixIn,
    PreforkThreadingTCPServer,
    PreforkUnixStreamServer,
)
from .worker import Worker

__all__ = [
    "BootError",
    "Hooks",
    "PidFileError",
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkThreadingMixIn",
    "PreforkThreadingTCPServer",
    "PreforkUnixStreamServer",
    "Preforker",
    "Worker",
]

__version__ = "0.1.0"
