"""MicroFaaS: the HTTP and WebSocket service that runs submitted functions in warm containers.

It translates requests into calls on the container pool in :mod:`pool`. :class:`Client`
(trio) and :class:`SyncClient` talk to a running server.
"""

__version__ = "0.1.0"

from .client import Client, ClientError, Stream, SyncClient  # noqa: E402

__all__ = ["Client", "ClientError", "Stream", "SyncClient", "__version__"]
