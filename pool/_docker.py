"""The one module that talks to the Docker engine.

Blocking SDK calls run in trio threads behind one limiter, each with a deadline. Exec
streams skip the SDK: the HTTP upgrade is done on a trio socket we own, so a stream costs
no thread and no byte is lost to an HTTP client's read-ahead buffer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import trio

from ._types import Profile

log = logging.getLogger("pool")

T = TypeVar("T")

DEFAULT_THREADS = 8
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_PULL_TIMEOUT = 600.0
IMAGE_CHUNK = 1 << 20
_FRAME = struct.Struct(">BxxxI")
# The engine cuts a stream into frames of at most 32 KiB; anything bigger is not from it.
MAX_FRAME = 1 << 20
# Force-removals tried this many times, the n-th retry after n times this many seconds.
REMOVE_TRIES = 4
REMOVE_RETRY = 0.25


class EngineError(Exception):
    """The Docker engine refused or failed a request, or did not answer in time.
    ``status`` is the HTTP status of the engine's answer, when it gave one."""

    def __init__(self, *args: object, status: int | None = None) -> None:
        super().__init__(*args)
        self.status = status


class EngineTimeout(EngineError, trio.TooSlowError):
    """The engine did not answer within a call's deadline. An EngineError, as every other
    failure of the engine is; a TooSlowError too, as a deadline's end is in trio."""


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """``trio.fail_after(seconds)`` for a request to the engine: EngineTimeout if it ends."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise EngineTimeout(f"the Docker engine did not answer {what} within "
                            f"{seconds:g} s") from None


class ImageMissing(EngineError):
    """The image is neither local nor pullable."""


class CannotStart(EngineError):
    """The image cannot run the container's command (say, it has no python3)."""


class BadStream(EngineError):
    """A stream from the engine broke its framing: whatever is at its other end is not to
    be trusted any more."""


def _cannot_start(message: str) -> bool:
    return any(m in message for m in ("executable file not found", "no such file or directory",
                                      "exec format error"))


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    state: str
    labels: Mapping[str, str]
    created: float = 0.0  # when, in seconds since the epoch


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class Engine:
    """Async access to one Docker engine.

    Every method has a deadline (``call_timeout`` unless said otherwise) and raises
    :class:`EngineError` when the engine fails or is unreachable. Cancellation abandons
    the worker thread, which finishes on its own within the SDK's socket timeout.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        threads: int = DEFAULT_THREADS,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        pull_timeout: float = DEFAULT_PULL_TIMEOUT,
    ) -> None:
        self.base_url = base_url or _docker_host()
        self.call_timeout = call_timeout
        self.pull_timeout = pull_timeout
        self._limiter = trio.CapacityLimiter(threads)
        self._client: docker.DockerClient | None = None
        self._api_version: str | None = None
        self._calls = 0
        self._init_binary: bool | None = None

    def statistics(self) -> dict[str, Any]:
        return {"calls": self._calls, "threads_busy": self._limiter.borrowed_tokens}

    # -- plumbing -------------------------------------------------------------------------

    def _sdk(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.DockerClient(
                base_url=self.base_url, version="auto", timeout=int(self.call_timeout) + 5
            )
            self._api_version = self._client.api.api_version
        return self._client

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   **kwargs: Any) -> T:
        """Run a blocking SDK call in a worker thread, with a deadline."""
        self._calls += 1
        with _deadline(timeout or self.call_timeout, getattr(fn, "__name__", "a call")):
            try:
                return await trio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs),
                    limiter=self._limiter, abandon_on_cancel=True,
                )
            except docker.errors.ImageNotFound as exc:
                raise ImageMissing(str(exc)) from exc
            except docker.errors.APIError as exc:
                raise EngineError(str(exc), status=exc.status_code) from exc
            except docker.errors.DockerException as exc:
                raise EngineError(str(exc)) from exc
            except OSError as exc:  # the engine's socket is gone
                raise EngineError(f"Docker engine unreachable: {exc}") from exc

    async def api(self) -> docker.APIClient:
        if self._client is None:
            await self.call(self._sdk)
        assert self._client is not None
        return self._client.api

    # -- engine ---------------------------------------------------------------------------

    async def ping(self, timeout: float = 5.0) -> bool:
        """True when the engine answers within ``timeout`` seconds."""
        try:
            api = await self.api()
            return bool(await self.call(api.ping, timeout=timeout))
        except (EngineError, trio.TooSlowError):
            return False

    async def has_init(self) -> bool:
        """Whether the engine can run ``--init`` (tini reaps orphans as PID 1)."""
        if self._init_binary is None:
            info = await self.info()
            self._init_binary = bool(info.get("InitBinary"))
        return self._init_binary

    async def info(self) -> dict[str, Any]:
        """What ``docker info`` shows: the engine's name, its swarm, its resources."""
        api = await self.api()
        return await self.call(api.info)

    # -- containers -----------------------------------------------------------------------

    async def start_container(
        self, image: str, command: list[str], *, labels: Mapping[str, str], profile: Profile,
        workdir_root: str, capabilities: Iterable[str] = (),
    ) -> tuple[str, MuxStream]:
        """Create and start a hardened container; return its id and its main process's
        stdin, stdout and stderr. Pulls a missing image.

        ``command`` runs as root with only ``capabilities``, on a read-only root with
        size-capped tmpfs for every writable place. Its stdin is attached before the start
        and closed by the engine when that stream ends, whoever ends it (this process
        exiting, being killed, losing the engine): a command that exits at end-of-file
        stops the container, and the engine then removes it (a dead-man's switch).
        Raises CannotStart when the image cannot run ``command`` at all.
        """
        api = await self.api()
        init = await self.has_init()
        temp = f"size={profile.tmp_size},mode=1777,exec,nosuid,nodev"
        host_config = api.create_host_config(
            cap_drop=["ALL"],
            cap_add=list(capabilities) or None,
            security_opt=["no-new-privileges"],
            pids_limit=profile.pids,
            mem_limit=profile.memory,
            memswap_limit=profile.memory,
            nano_cpus=int(profile.cpus * 1e9),
            network_mode="bridge" if profile.network else "none",
            init=init or None,
            auto_remove=True,
            # What the main process writes is the agent's stream, not a log to keep.
            log_config=docker.types.LogConfig(type="none"),
            # Nothing a function writes reaches the host's disk: the root is read-only and
            # every writable place is a size-capped tmpfs, whose pages count against the
            # container's memory limit (the per-container budget the kernel enforces).
            read_only=True,
            shm_size=profile.tmp_size,
            # SysV shared memory goes with the last process attached to it, even where the
            # clean-up between functions cannot remove it (an image without python3).
            sysctls={"kernel.shm_rmid_forced": "1"},
            tmpfs={
                "/tmp": temp, "/var/tmp": temp, "/run": "size=1m,mode=0755,nosuid,nodev",
                # Working directories: the root owns their parent; sticky, and not
                # listable, so a function can make its own but not find or touch another's.
                workdir_root: f"size={profile.workdir_size},uid=0,gid=0,mode=1733,exec,"
                              "nosuid,nodev",
            },
        )
        create = functools.partial(
            api.create_container, image, command=command, labels=dict(labels), user="0:0",
            # Not detached, so docker-py also sets StdinOnce: stdin closes when we let go.
            host_config=host_config, network_disabled=not profile.network, stdin_open=True,
        )
        try:
            created = await self.call(create)
        except ImageMissing:
            await self.pull(image)
            created = await self.call(create)
        cid = created["Id"]
        try:
            stream = await self.attach_open(cid)
            try:
                await self.call(api.start, cid)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.remove(cid)
            if isinstance(exc, EngineError) and _cannot_start(str(exc)):
                raise CannotStart(str(exc)) from exc
            raise
        return cid, stream

    async def image_id(self, image: str, *, pull: bool = True) -> str:
        """The ID of ``image`` (any spelling: a name, a tag, a digest, an ID or a prefix of
        one), pulled first when the engine lacks it (unless not ``pull``); raise
        ImageMissing."""
        api = await self.api()
        try:
            return str((await self.call(api.inspect_image, image))["Id"])
        except ImageMissing:
            if not pull:
                raise
            await self.pull(image)
            return str((await self.call(api.inspect_image, image))["Id"])

    async def pull(self, image: str) -> None:
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        client = self._sdk()
        try:
            await self.call(client.images.pull, repo, tag or "latest", timeout=self.pull_timeout)
        except EngineError as exc:
            raise ImageMissing(f"image {image!r} is not available: {exc}") from exc

    async def export_image(self, image: str, chunk: int = IMAGE_CHUNK
                           ) -> AsyncGenerator[bytes, None]:
        """``docker save`` of one image, as chunks of at most ``chunk`` bytes; each chunk
        has the deadline of one call."""
        api = await self.api()
        chunks = await self.call(api.get_image, image, chunk)
        try:
            while (data := await self.call(next, chunks, None)) is not None:
                yield data
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(chunks.close, abandon_on_cancel=True)
                except ValueError:
                    pass  # a cancelled call still reads it ("generator already executing")

    async def import_image(self, chunks: trio.abc.ReceiveChannel[bytes]) -> list[str]:
        """``docker load`` of the tar whose chunks ``chunks`` yields, within
        ``pull_timeout``; return what the engine says it loaded."""
        api = await self.api()

        def body() -> Iterator[bytes]:  # read in the worker thread, from trio
            while True:
                try:
                    yield trio.from_thread.run(chunks.receive)
                except trio.EndOfChannel:
                    return

        def load() -> list[str]:
            said = []
            for event in api.load_image(body()):
                if isinstance(event, dict) and event.get("error"):
                    raise docker.errors.DockerException(event["error"])
                if isinstance(event, dict) and event.get("stream"):
                    said.append(str(event["stream"]).strip())
            return said

        return await self.call(load, timeout=self.pull_timeout)

    async def remove(self, cid: str, timeout: float = 10.0) -> bool:
        """Force-remove a container: False if the engine had no such container (already
        gone is not an error), else True once it is gone or going.

        A removal already under way (AutoRemove, another caller) or refused for now (the
        engine could not unmount it yet) is tried again a few times: one that fails
        leaves a container "dead", which only another removal takes away."""
        api = await self.api()
        tries = 0
        while True:
            try:
                await self.call(api.remove_container, cid, force=True, v=True, timeout=timeout)
                return True
            except EngineError as exc:
                if exc.status == 404:  # gone: by an earlier try's doing, if there was one
                    return tries > 0
                tries += 1
                if tries == REMOVE_TRIES:
                    if "already in progress" in str(exc):
                        return True  # still going: the engine finishes it
                    raise
            await trio.sleep(REMOVE_RETRY * tries)

    async def remove_each(self, cids: Iterable[str]) -> set[str]:
        """Remove these containers at once; one that cannot be is logged, not raised (a
        sweep that comes again tries it again). Gives those the engine said it does not
        have: gone already, or only a stale entry of its container list."""
        missing: set[str] = set()

        async def remove(cid: str) -> None:
            try:
                if not await self.remove(cid):
                    missing.add(cid)
            except EngineError as exc:
                log.warning("could not remove container %s: %s", cid[:12], exc)

        async with trio.open_nursery() as nursery:
            for cid in cids:
                nursery.start_soon(remove, cid)
        return missing

    async def containers(self, labels: Mapping[str, str] | Iterable[str]) -> list[ContainerInfo]:
        """Containers (running or not) carrying all the given labels (``k=v`` or ``k``)."""
        api = await self.api()
        if isinstance(labels, Mapping):
            wanted = [f"{k}={v}" for k, v in labels.items()]
        else:
            wanted = list(labels)
        found = await self.call(api.containers, all=True, filters={"label": wanted})
        return [ContainerInfo(c["Id"], c.get("State", ""), c.get("Labels") or {},
                              float(c.get("Created") or 0)) for c in found]

    async def inspect(self, cid: str) -> dict[str, Any]:
        api = await self.api()
        return await self.call(api.inspect_container, cid)

    # -- exec -----------------------------------------------------------------------------

    async def exec_create(
        self, cid: str, argv: list[str], *, env: Mapping[str, str] | None = None,
        user: str = "",
    ) -> str:
        api = await self.api()
        created = await self.call(
            api.exec_create, cid, argv, stdin=True, stdout=True, stderr=True,
            environment=dict(env) if env else None, user=user,
        )
        return created["Id"]

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        api = await self.api()
        return await self.call(api.exec_inspect, exec_id)

    async def exec_open(self, exec_id: str, timeout: float | None = None) -> MuxStream:
        """Start an exec and return its stdin/stdout/stderr as one held-open stream."""
        return await self._hijack(f"/exec/{exec_id}/start", b'{"Detach":false,"Tty":false}',
                                  timeout)

    async def attach_open(self, cid: str, timeout: float | None = None) -> MuxStream:
        """Attach to a container's main process: its stdin/stdout/stderr as one stream."""
        return await self._hijack(f"/containers/{cid}/attach?stream=1&stdin=1&stdout=1"
                                  "&stderr=1", b"", timeout)

    async def _hijack(self, path: str, body: bytes, timeout: float | None) -> MuxStream:
        """An HTTP request upgraded to a raw stream, done on a trio socket we own."""
        await self.api()
        self._calls += 1
        with _deadline(timeout or self.call_timeout, path.split("?")[0]):
            stream = await self._connect()
            try:
                request = (
                    f"POST /v{self._api_version}{path} HTTP/1.1\r\n"
                    "Host: docker\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
                ).encode() + body
                await stream.send_all(request)
                head, rest = await _read_head(stream)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                raise
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] not in ("101", "200"):
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise EngineError(f"{path.split('?')[0]} refused: {status_line} {rest[:200]!r}")
        return MuxStream(stream, rest)

    async def _connect(self) -> trio.abc.Stream:
        url = urllib.parse.urlsplit(self.base_url)
        try:
            if url.scheme in ("unix", "http+unix"):
                return await trio.open_unix_socket(url.path)
            if url.scheme in ("tcp", "http"):
                return await trio.open_tcp_stream(url.hostname or "localhost", url.port or 2375)
        except OSError as exc:
            raise EngineError(f"Docker engine unreachable at {self.base_url}: {exc}") from exc
        raise EngineError(f"unsupported DOCKER_HOST for exec streams: {self.base_url}")

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await trio.to_thread.run_sync(client.close)


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EngineError("engine closed the exec connection before answering")
        buf += chunk
        if len(buf) > 65536:
            raise EngineError("engine sent an oversized HTTP head")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


class _SendLock:
    """Keeps one stream's writers from interleaving their bytes. Unlike trio.Lock it takes
    no checkpoint of its own when free: the send it guards is one, and on this hot path a
    scheduling round costs tens of microseconds."""

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiting.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        self._waiting.unpark()


class MuxStream:
    """An exec's or an attached process's stdin (send) and its multiplexed stdout/stderr
    (receive).

    ``receive()`` returns ``(fd, data)`` with fd 1 or 2, or ``None`` at end of stream; a
    frame that is not one of those, or claims more than ``max_frame`` bytes, raises
    BadStream before anything is allocated for it.
    """

    def __init__(self, stream: trio.abc.Stream, buffered: bytes = b"", *,
                 max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self._buf = bytearray(buffered)
        self._send_lock = _SendLock()
        self.max_frame = max_frame

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def close_stdin(self) -> None:
        async with self._send_lock:
            if isinstance(self._stream, trio.abc.HalfCloseableStream):
                await self._stream.send_eof()

    async def receive(self) -> tuple[int, bytes] | None:
        while True:
            if len(self._buf) >= _FRAME.size:
                fd, size = _FRAME.unpack_from(self._buf)
                if fd not in (1, 2) or size > self.max_frame:
                    raise BadStream(f"the engine's stream sent a frame for fd {fd} of "
                                    f"{size} bytes")
                if len(self._buf) >= _FRAME.size + size:
                    data = bytes(self._buf[_FRAME.size:_FRAME.size + size])
                    del self._buf[:_FRAME.size + size]
                    return fd, data
            chunk = await self._stream.receive_some(262144)
            if not chunk:
                return None
            self._buf += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

