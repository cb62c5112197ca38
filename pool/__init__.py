"""Warm Docker container pools that run functions in milliseconds.

Knows nothing of HTTP: a caller leases a container from a :class:`Pool`, runs one
:class:`Job` in it and gets a :class:`Result`. :class:`Pools` keeps one pool per image.
"""

from ._agent import output_matches  # the agent's matcher; the exec path's too
from ._docker import (
    DEFAULT_CALL_TIMEOUT,
    ContainerInfo,
    Engine,
    EngineError,
    EngineTimeout,
    ImageMissing,
)
from ._pool import (
    DEFAULT_IDLE_TTL,
    DEFAULT_MAX,
    DEFAULT_MAX_CONTAINERS,
    DEFAULT_MIN_IDLE,
    Container,
    Lease,
    LeaseTimeout,
    Pool,
    PoolClosed,
    PoolError,
    Pools,
    PoolStatistics,
)
from ._runner import WORKDIR_ROOT, OnFile, Output
from ._types import (
    DEFAULT_OUTPUT_CAP,
    BadFile,
    File,
    Job,
    MiB,
    OutputFile,
    Outputs,
    Place,
    Profile,
    Result,
    check_files,
    check_path,
    check_pattern,
    check_tree,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT", "DEFAULT_IDLE_TTL", "DEFAULT_MAX", "DEFAULT_MAX_CONTAINERS",
    "DEFAULT_MIN_IDLE",
    "DEFAULT_OUTPUT_CAP", "WORKDIR_ROOT", "BadFile", "Container", "ContainerInfo", "Engine",
    "EngineError", "EngineTimeout", "File", "ImageMissing", "Job", "Lease", "LeaseTimeout",
    "MiB", "OnFile",
    "Output", "OutputFile", "Outputs", "Place", "Pool", "PoolClosed", "PoolError",
    "PoolStatistics", "Pools", "Profile", "Result", "check_files", "check_path",
    "check_pattern", "check_tree", "output_matches",
]
