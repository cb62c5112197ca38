"""Warm Docker container pools that run functions in milliseconds.

Knows nothing of HTTP: a caller leases a container from a :class:`Pool`, runs one
:class:`Job` in it and gets a :class:`Result`. :class:`Pools` keeps one pool per image.
"""

from ._docker import ContainerInfo, Engine, EngineError, ImageMissing
from ._pool import Container, Lease, Pool, PoolClosed, PoolError, Pools, PoolStatistics
from ._runner import WORKDIR_ROOT
from ._types import BadFile, File, Job, Place, Profile, Result, check_files, check_path

__all__ = [
    "BadFile", "Container", "ContainerInfo", "Engine", "EngineError", "File", "ImageMissing",
    "Job", "Lease", "Place", "Pool", "PoolClosed", "PoolError", "PoolStatistics", "Pools",
    "Profile", "Result", "WORKDIR_ROOT", "check_files", "check_path",
]
