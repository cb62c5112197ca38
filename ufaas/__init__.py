"""MicroFaaS: the HTTP and WebSocket service that runs submitted functions in warm containers.

It translates requests into calls on the container pool in :mod:`pool`. :class:`Client`
(trio) and :class:`SyncClient` talk to a running server.
"""

import sys

__version__ = "0.1.0"

# httpx's package imports its command-line client whenever click, rich and pygments are
# installed (rich comes with many tools): 3 MiB of the server's memory and 50 ms of its
# start, for a command ufaas never runs. An import that finds None in sys.modules fails,
# and httpx expects that one to fail: its main() then only says what is missing.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from .client import Client, ClientError, Stream, SyncClient  # noqa: E402

__all__ = ["Client", "ClientError", "Stream", "SyncClient", "__version__"]
