"""Plain values shared by the pool: container profiles, jobs and their results."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

MiB = 1 << 20
DEFAULT_OUTPUT_CAP = 1 * MiB
# Linux's NAME_MAX, and a path well under PATH_MAX once below the working directory.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024


class BadFile(ValueError):
    """A file would land outside the function's working directory."""


@dataclass(frozen=True)
class Profile:
    """Container settings that every container of a pool shares."""

    memory: int = 512 * MiB
    cpus: float = 1.0
    pids: int = 256
    network: bool = False
    user: str = "65534:65534"  # the functions': the agent runs as root, with 3 capabilities
    workdir_size: int = 256 * MiB
    # Each of /tmp, /var/tmp and /dev/shm (tmpfs, like everything writable).
    tmp_size: int = 64 * MiB
    # Python functions fork from a zygote that has imported ``preload`` (pool/_zygote.py);
    # without ``zygote`` every function starts a fresh interpreter.
    zygote: bool = True
    preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        uid, _, gid = self.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise ValueError(f"profile user must be numeric 'uid:gid', not {self.user!r}")
        if self.memory < 16 * MiB or self.pids < 8 or self.cpus <= 0:
            raise ValueError("profile limits too small: memory >= 16 MiB, pids >= 8, cpus > 0")
        if self.workdir_size < MiB or self.tmp_size < MiB:
            raise ValueError("profile sizes too small: workdir_size and tmp_size >= 1 MiB")
        for name in self.preload:
            if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
                raise ValueError(f"preload: {name!r} is not a module name")


def check_path(path: str) -> str:
    """Return ``path`` if it is a plain relative path with no ``..``; else raise BadFile."""
    if not isinstance(path, str) or not path:
        raise BadFile("path is empty")
    if "\x00" in path:
        raise BadFile(f"{path!r}: contains a NUL byte")
    if path.startswith("/"):
        raise BadFile(f"{path!r}: absolute paths are not allowed")
    parts = path.split("/")
    if any(p in ("..",) for p in parts):
        raise BadFile(f"{path!r}: '..' is not allowed")
    if any(p in ("", ".") for p in parts) or posixpath.normpath(path) != path:
        raise BadFile(f"{path!r}: not a normalised relative path")
    # Bytes, as the filesystem counts them: 200 "é" are 400 bytes, too many for a name.
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
            len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        raise BadFile(f"{path[:40]!r}...: too long (at most {MAX_NAME_BYTES} bytes a name, "
                      f"{MAX_PATH_BYTES} in all)")
    return path


@dataclass(frozen=True)
class File:
    """A file to place in the working directory before the command runs.

    Not checked when made: :func:`check_files` checks a job's files once, and the agent
    refuses a bad path inside the container whatever the host let through.
    """

    path: str
    data: bytes
    mode: int = 0o644


def check_files(files: list[File]) -> None:
    """Refuse bad paths or modes, and a set of paths :func:`check_tree` refuses."""
    for f in files:
        check_path(f.path)
        if not 0 <= f.mode <= 0o777:
            raise BadFile(f"{f.path!r}: mode {f.mode:o} out of range")
    check_tree([f.path for f in files])


def check_tree(paths: list[str]) -> None:
    """Refuse checked paths where one is given twice, or is also another's directory."""
    unique = set(paths)
    if len(unique) != len(paths):
        raise BadFile("the same path is given twice")
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in unique:
                raise BadFile(f"{prefix!r} is a file and also the directory of {path!r}")


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it names files inside a working directory (a relative path
    whose parts may be globs, ``**`` for any depth); else raise BadFile."""
    if not isinstance(pattern, str) or not pattern:
        raise BadFile("an output pattern is empty")
    parts = pattern.split("/")
    if "\x00" in pattern or pattern.startswith("/") or ".." in parts:
        raise BadFile(f"{pattern[:60]!r}: outputs are relative paths inside the working "
                      "directory, with no '..'")
    if any(p in ("", ".") for p in parts) or len(pattern.encode(errors="replace")) > 1024:
        raise BadFile(f"{pattern[:60]!r}: not a normalised relative path")
    return pattern



@dataclass(frozen=True)
class Outputs:
    """Files to collect from the working directory when the function ends, however it
    ends; each capped, and all of them together, in bytes and in number."""

    patterns: tuple[str, ...]
    max_file: int = 8 * MiB
    max_total: int = 32 * MiB
    max_count: int = 64


@dataclass
class OutputFile:
    """A file collected: ``size`` bytes of it were kept (fewer than it had when
    ``truncated``). ``data`` only when the run was given no place to write it."""

    path: str
    size: int = 0
    sha256: str = ""
    truncated: bool = False
    data: bytes | None = None


@dataclass
class Job:
    """One function to run in a leased container."""

    argv: list[str]
    files: list[File] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    timeout: float = 30.0
    output_cap: int = DEFAULT_OUTPUT_CAP
    id: str = ""
    fresh: bool = False  # a Python command starts a new interpreter, not from a zygote
    # Limits of the function's own process, set before it starts (and inherited by what it
    # starts): CPU seconds (then SIGKILL) and bytes of address space. None: the profile's.
    cpu_limit: int | None = None
    memory_limit: int | None = None
    outputs: Outputs | None = None


@dataclass(frozen=True)
class Place:
    """Where a function ran: its container and working directory, for a locality follow-up;
    in a cluster, also the node of that container."""

    container: str
    workdir: str
    node: str | None = None


@dataclass
class Result:
    """How a function ended.

    ``outcome`` is one of ``exited`` (see ``exit_code``/``signal``), ``timeout``,
    ``cancelled``, ``refused`` (bad files: nothing ran) or ``error`` (the container or the
    engine failed; ``error`` says why).
    """

    outcome: str
    exit_code: int | None = None
    signal: int | None = None
    duration_ms: float | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    oom: bool = False
    error: str | None = None
    place: Place | None = None
    # Whether it was forked from a zygote; the CPU it used and its peak memory (rusage).
    forked: bool = False
    cpu_ms: float | None = None
    max_rss: int | None = None
    # The output files collected, in path order; whether some that matched were left out
    # (more than max_count, or past max_total).
    files: list[OutputFile] = field(default_factory=list)
    files_truncated: bool = False
    files_error: str | None = None
