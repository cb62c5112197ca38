"""The server's one typed configuration: defaults, then a TOML file, then UFAAS_* variables,
then command-line options, each overriding the one before.

Every default of the service lives here, once; container profiles and pool sizes default
to the pool library's own values, which this module names rather than repeats.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from semantic_version import Version

import pool
from pool import MiB, Profile

from .fetch import AddressPolicy
from .live import WATCHER_BYTES
from .spec import Limits

ENV_PREFIX = "UFAAS_"
# Settings that are tables in TOML: not settable from a single environment variable.
_TABLES = ("pools", "labels", "fetch_allow", "runtimes", "cluster")
DEFAULT_NODE_PORT = 8001


def default_db() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(base, "ufaas", "ufaas.db")


class ConfigError(Exception):
    """The configuration file or variables are invalid."""


class PoolConfig(BaseModel):
    """A pool started with the server: ``[[pools]]`` in the TOML file.

    A setting left out takes the server-wide one (``min_idle``, ``max``, ``idle_ttl``) or the
    container profile's default (the rest).
    """

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1)
    min_idle: int | None = Field(None, ge=0, le=256)
    max: int | None = Field(None, ge=1, le=1024)
    idle_ttl: float | None = Field(None, gt=0)
    memory: int | None = Field(None, description="bytes per container")
    cpus: float | None = None
    pids: int | None = None
    network: bool = False
    user: str | None = None
    workdir_size: int | None = Field(None, description="bytes of the working directories")
    tmp_size: int | None = Field(None, description="bytes of /tmp, of /var/tmp and of /dev/shm")
    zygote: bool | None = Field(None, description="Python functions fork from a warm "
                                "interpreter (default true)")
    preload: list[str] | None = Field(None, description="modules that interpreter imports "
                                      "first (default none)")

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.min_idle is not None and self.max is not None and self.min_idle > self.max:
            raise ValueError("min_idle must not exceed max")
        self.profile()  # raises on a bad user or limits
        return self

    def profile(self) -> Profile:
        given = {name: getattr(self, name) for name in
                 ("memory", "cpus", "pids", "network", "user", "workdir_size", "tmp_size",
                  "zygote")}
        if self.preload is not None:
            given["preload"] = tuple(self.preload)
        return Profile(**{k: v for k, v in given.items() if v is not None})

    def sizes(self, config: Config) -> dict[str, Any]:
        """``min_idle``, ``max`` and ``idle_ttl`` of this pool, the server's where not given."""
        return {name: getattr(config, name) if getattr(self, name) is None
                else getattr(self, name) for name in ("min_idle", "max", "idle_ttl")}


class RuntimeConfig(BaseModel):
    """A runtime of the Piston-compatible API: ``[[runtimes]]`` in the TOML file.

    ``run`` (and ``compile``, a step that runs first in the same working directory) is an
    argument list where ``{file}`` stands for the first code file and ``{files}`` for all
    of them; the caller's ``args`` follow ``run``'s.
    """

    model_config = ConfigDict(extra="forbid")

    language: str = Field(min_length=1)
    version: str = Field(min_length=1, description="semver, say 3.11.2")
    aliases: list[str] = Field(default_factory=list)
    runtime: str | None = None
    image: str = Field(min_length=1)
    run: list[str] = Field(min_length=1)
    compile: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        try:
            Version.coerce(version)
        except ValueError:
            raise ValueError(f"{version!r} is not a version (say 3.11.2)") from None
        return version


# The runtimes of the images the tests build (tests/images.py); see README for more.
DEFAULT_RUNTIMES = [
    RuntimeConfig(language="python", version="3.11.2", aliases=["py", "py3", "python3"],
                  image="ufaas-test/python", run=["python3", "{file}"]),
    RuntimeConfig(language="sh", version="1.35.0", aliases=["shell", "busybox"],
                  image="ufaas-test/busybox", run=["sh", "{file}"]),
]


def _read_secret(path: str, name: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not secret:
        raise ValueError(f"{name}: {path} is empty")
    return secret


class ClusterConfig(BaseModel):
    """Where a front finds its nodes, and what a front and its nodes share: ``[cluster]``
    in the TOML file, ``UFAAS_CLUSTER_<NAME>`` in the environment (``nodes`` as a
    comma-separated list). Without ``nodes`` or ``swarm_service`` there is no cluster."""

    model_config = ConfigDict(extra="forbid")

    nodes: list[str] = Field(default_factory=list, description="URLs of the nodes, "
                             "ws://HOST:PORT")
    swarm_service: str | None = Field(None, description="find the nodes as the tasks of "
                                      "this Swarm service (DNS tasks.<service>)")
    node_port: int = Field(DEFAULT_NODE_PORT, ge=0, le=65535, description="the port of "
                           "nodes found in the Swarm, and where ufaas node listens")
    listen: str = Field("0.0.0.0", description="the address ufaas node listens on")
    token: str | None = Field(None, description="the token fronts and nodes share")
    token_file: str | None = Field(None, description="a file holding it (a Docker secret)")
    local: bool = Field(True, description="the front's own Docker engine is a node too")
    name: str | None = Field(None, description="this machine's name as a node (the "
                             "engine's name)")
    heartbeat: float = Field(1.0, gt=0, description="seconds between two beats")
    node_timeout: float = Field(5.0, gt=0, description="seconds of silence before a peer "
                                "is lost")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to a node")
    discovery_interval: float = Field(2.0, gt=0, description="seconds between two looks "
                                      "for Swarm nodes")
    front_grace: float = Field(30.0, ge=0, description="seconds a node keeps the warm "
                               "containers of a front that went away")
    max_message: int = Field(128 * MiB, ge=MiB, description="bytes of one message between "
                             "a front and a node")
    image_max_bytes: int = Field(4096 * MiB, ge=MiB, description="bytes of an image "
                                 "streamed from one node to another")
    image_timeout: float = Field(600.0, gt=0, description="seconds one image stream may "
                                 "take")

    @model_validator(mode="after")
    def _nodes(self) -> ClusterConfig:
        for url in self.nodes:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme != "ws" or not parsed.hostname or parsed.path not in ("", "/"):
                raise ValueError(f"node {url!r}: give ws://HOST:PORT")
            parsed.port  # noqa: B018 - raises on a bad port
        if self.token_file is not None and self.token is None:
            self.token = _read_secret(self.token_file, "token_file")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.nodes or self.swarm_service)

    def secret(self) -> str | None:
        return self.token or None


class Config(BaseModel):
    """Every setting of the server, each with a default that works on one machine."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str = Field(default_factory=default_db)
    token: str | None = None
    token_file: str | None = Field(None, description="a file holding the token (a Docker "
                                   "secret), read at start")
    insecure: bool = False
    docker_host: str | None = None
    # Limits on what callers send.
    max_body: int = Field(64 * MiB, ge=1024, description="bytes of one request body")
    max_timeout: float = Field(300.0, gt=0)
    default_timeout: float = Field(30.0, gt=0)
    max_resources: int = Field(256, ge=0)
    max_file_bytes: int = Field(8 * MiB, ge=0)
    max_total_bytes: int = Field(32 * MiB, ge=0)
    output_cap: int = Field(pool.DEFAULT_OUTPUT_CAP, ge=1024,
                            description="bytes kept per stream")
    stream_buffer: int = Field(WATCHER_BYTES, ge=65536, description="bytes of live output "
                               "buffered per WebSocket client before it misses some")
    # Scheduling.
    queue_limit: int = Field(1000, ge=1, description="pending functions before 429")
    pending_bytes: int = Field(64 * MiB, ge=0, description="bytes of embedded content "
                               "that waiting functions keep in memory; the rest wait with "
                               "their specs on disk")
    queue_timeout: float = Field(600.0, gt=0, description="longest wait for a container")
    max_wait: float = Field(300.0, gt=0, description="longest ?wait= a request may hold")
    max_list: int = Field(1000, ge=1, description="most records one listing returns")
    max_list_bytes: int = Field(16 * MiB, ge=1024, description="most bytes of JSON one "
                                "listing returns (one record at least)")
    # Pools made on first use for images not listed in [[pools]], and the sizes of those
    # listed that do not give their own.
    max_containers: int = Field(pool.DEFAULT_MAX_CONTAINERS, ge=1, description="containers "
                                "of every pool together")
    min_idle: int = Field(pool.DEFAULT_MIN_IDLE, ge=0)
    max: int = Field(pool.DEFAULT_MAX, ge=1)
    idle_ttl: float = Field(pool.DEFAULT_IDLE_TTL, gt=0)
    pools: list[PoolConfig] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="extra labels on every container")
    # URL resources.
    download_max_bytes: int = Field(8 * MiB, ge=1)
    download_timeout: float = Field(30.0, gt=0, description="seconds one download may take "
                                    "once it has its slot")
    fetch_allow: list[str] = Field(default_factory=list, description="CIDRs and host names "
                                   "(*.domain for a whole domain) that downloads may reach "
                                   "although the address policy refuses them")
    fetch_proxy: str | None = Field(None, description="an HTTP proxy for downloads (proxy "
                                    "variables of the environment are never used)")
    # Output files (a spec's "outputs"): caps per function, and on all that is kept.
    output_max_file: int = Field(8 * MiB, ge=0, description="bytes kept of one output file")
    output_max_total: int = Field(32 * MiB, ge=0, description="bytes of output files kept "
                                  "per function")
    output_max_count: int = Field(64, ge=0, description="output files kept per function")
    files_dir: str | None = Field(None, description="where output files are kept (default: "
                                  "beside the database, in files/)")
    files_max_bytes: int = Field(1024 * MiB, ge=0, description="bytes of output files kept "
                                 "in all; past it new ones are cut")
    files_retention: float = Field(7 * 86400.0, gt=0, description="seconds output files are "
                                   "kept (their records stay)")
    # Callbacks (a spec's "callback").
    callback_secret: str | None = Field(None, description="key of the HMAC-SHA256 signature "
                                        "of each callback's body (none without it)")
    callback_timeout: float = Field(10.0, gt=0, description="seconds one attempt may take")
    callback_attempts: int = Field(8, ge=1, description="attempts before a callback fails")
    callback_backoff: float = Field(1.0, gt=0, description="seconds before the first retry; "
                                    "each next one waits twice as long (at most an hour)")
    # The HTTP server's own deadlines on its clients.
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to "
                                  "send a request's head, and may stay idle between two")
    body_timeout: float = Field(60.0, gt=0, description="seconds a client may take to send "
                                "a request's body")
    send_timeout: float = Field(60.0, gt=0, description="seconds an answer may take to "
                                "reach its client")
    # The Piston-compatible API: its runtimes, and the limits of each stage (a request
    # may ask for less, not more).
    runtimes: list[RuntimeConfig] = Field(default_factory=lambda: list(DEFAULT_RUNTIMES))
    piston_run_timeout: float = Field(3.0, gt=0, description="seconds")
    piston_compile_timeout: float = Field(10.0, gt=0, description="seconds")
    piston_run_cpu_time: float = Field(3.0, gt=0, description="CPU seconds")
    piston_compile_cpu_time: float = Field(10.0, gt=0, description="CPU seconds")
    # Engine and shutdown.
    engine_timeout: float = Field(pool.DEFAULT_CALL_TIMEOUT, gt=0,
                                  description="deadline of one engine call")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds running functions get")
    cluster: ClusterConfig = Field(default_factory=lambda: ClusterConfig.model_validate({}))

    @model_validator(mode="after")
    def _timeouts(self) -> Config:
        if self.token_file is not None and self.token is None:
            self.token = _read_secret(self.token_file, "token_file")
        if self.default_timeout > self.max_timeout:
            raise ValueError("default_timeout must not exceed max_timeout")
        if max(self.piston_run_timeout, self.piston_compile_timeout) > self.max_timeout:
            raise ValueError("piston_run_timeout and piston_compile_timeout must not exceed "
                             "max_timeout")
        for pc in self.pools:
            sizes = pc.sizes(self)
            if sizes["min_idle"] > sizes["max"]:
                raise ValueError(f"pool {pc.image}: min_idle must not exceed max")
        return self

    def limits(self) -> Limits:
        return Limits(max_timeout=self.max_timeout, default_timeout=self.default_timeout,
                      max_resources=self.max_resources, max_file_bytes=self.max_file_bytes,
                      max_total_bytes=self.max_total_bytes,
                      url_refusal=AddressPolicy(self.fetch_allow).check_literal)

    def profiles(self) -> dict[tuple[str, bool], Profile]:
        """The container profile of each configured pool, by image and network; any other
        pool has the default profile with its network setting."""
        return {(pc.image, pc.network): pc.profile() for pc in reversed(self.pools)}

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict[str, str] | None = None,
             **overrides: Any) -> Config:
        """Defaults < TOML file < ``UFAAS_*`` variables < ``overrides`` (None ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data.update(tomllib.loads(Path(path).read_text()))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
        env = os.environ if environ is None else environ
        for name in cls.model_fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and name not in _TABLES:
                data[name] = value
        cluster = data.setdefault("cluster", {})
        if isinstance(cluster, dict):
            for name in ClusterConfig.model_fields:
                value = env.get(f"{ENV_PREFIX}CLUSTER_{name.upper()}")
                if value is not None:
                    cluster[name] = ([u.strip() for u in value.split(",") if u.strip()]
                                     if name == "nodes" else value)
        for name, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **value}  # a table: merged, key by key
            elif value is not None:
                data[name] = value
        try:
            # Variables arrive as strings: let pydantic convert them (lax mode).
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid configuration: {problems}") from exc

    def files_root(self) -> str | None:
        """Where output files are kept; None (a temporary place) with an in-memory db."""
        if self.files_dir is not None:
            return self.files_dir
        if self.db == ":memory:":
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.db)), "files")

    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
