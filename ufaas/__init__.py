"""MicroFaaS: the HTTP and WebSocket service that runs submitted functions in warm containers.

It translates requests into calls on the container pool in :mod:`pool`.
"""

__version__ = "0.1.0"
