"""The output files functions hand back, kept on disk next to the database.

Each function's files live in a directory of their own named by its id, as ``0``, ``1``, ...
in the order its record lists them, so no name a function chose ever becomes a path here.
All of them together stay within ``max_bytes``: a function is granted its share of room
before its files are collected (and gives back what it did not use), so when the disk
budget runs out its files are cut and the record says so. Files go after ``retention``
seconds, or with their record.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import trio

from pool import Result

log = logging.getLogger("ufaas")

CHUNK = 256 * 1024
_UUID_CHARS = frozenset("0123456789abcdef-")


class Gone(Exception):
    """The files were collected but are no longer kept (past retention)."""


class FileStore:
    """Output files under ``root``, within ``max_bytes`` in all, for ``retention`` s."""

    def __init__(self, root: str | Path | None, *, max_bytes: int, retention: float) -> None:
        self._temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ufaas-files-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.retention = retention
        self.used = 0  # bytes on disk
        self.granted = 0  # bytes promised to collections under way, not yet written
        self.cut = 0  # functions whose files the budget cut

    async def open(self) -> None:
        """Count what an earlier run left (and drop what is past retention)."""
        self.used, _ = await trio.to_thread.run_sync(self._sweep_sync, time.time())

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def statistics(self) -> dict[str, Any]:
        return {"bytes": self.used, "max_bytes": self.max_bytes,
                "retention": self.retention, "cut_by_budget": self.cut}

    def _dir(self, fid: str) -> Path:
        if not fid or not set(fid) <= _UUID_CHARS:
            raise ValueError(f"not a function id: {fid!r}")
        return self.root / fid

    # -- writing ------------------------------------------------------------------------------

    def grant(self, wanted: int) -> int:
        """Room for up to ``wanted`` bytes of one function's files (less when the budget is
        nearly used); give back what is left with :meth:`Writer.close`."""
        room = max(min(wanted, self.max_bytes - self.used - self.granted), 0)
        self.granted += room
        return room

    def writer(self, fid: str, wanted: int) -> Writer:
        """The writer of one function's files, granted room for up to ``wanted`` bytes."""
        return Writer(self, self._dir(fid), wanted)

    # -- reading ------------------------------------------------------------------------------

    async def file(self, fid: str, index: int, size: int) -> Download:
        """File ``index`` of function ``fid`` (in its record's order), ``size`` bytes long;
        raise Gone when it is no longer kept."""
        handles = await self._kept(fid, [index])
        return Download(size, handles, _read(handles[0], size))

    async def tar(self, fid: str, files: list[dict[str, Any]]) -> Download:
        """A tar of the files of ``fid`` (as its record lists them); raise Gone when they
        are no longer kept."""
        mtime = time.time()
        heads = []
        for f in files:
            info = tarfile.TarInfo(f["path"])
            info.size, info.mode, info.mtime = f["size"], 0o644, mtime
            heads.append(info.tobuf(format=tarfile.PAX_FORMAT))
        length = sum(len(h) + _padded(f["size"]) for h, f in zip(heads, files, strict=True))
        length += 2 * tarfile.BLOCKSIZE
        # Opened last: from here nothing can fail before the Download owns them.
        handles = await self._kept(fid, range(len(files)))

        async def archive() -> AsyncGenerator[bytes, None]:
            for head, f, handle in zip(heads, files, handles, strict=True):
                yield head
                async for chunk in _read(handle, f["size"]):
                    yield chunk
                yield bytes(_padded(f["size"]) - f["size"])
            yield bytes(2 * tarfile.BLOCKSIZE)

        return Download(length, handles, archive())

    async def _kept(self, fid: str, indexes: Iterable[int]) -> list[BinaryIO]:
        """These files of function ``fid``, open (off the event loop), so that a sweep
        that removes them meanwhile takes nothing from an answer under way; raise Gone
        when they are no longer kept."""
        return await trio.to_thread.run_sync(self._open_sync, fid, list(indexes))

    def _open_sync(self, fid: str, indexes: list[int]) -> list[BinaryIO]:
        handles: list[BinaryIO] = []
        try:
            for index in indexes:
                handles.append(open(self._dir(fid) / str(index), "rb"))
        except OSError as exc:
            _close_all(handles)
            if isinstance(exc, FileNotFoundError):
                raise Gone(f"the files of function {fid} are no longer kept "
                           f"(files_retention is {self.retention:g} s)") from None
            raise
        return handles

    # -- removing -----------------------------------------------------------------------------

    async def remove(self, fid: str) -> None:
        """The files of ``fid`` go (its record was purged)."""
        directory = self._dir(fid)
        freed = await trio.to_thread.run_sync(_remove_tree, directory)
        self.used = max(self.used - freed, 0)

    async def sweep_forever(self) -> None:
        """Remove the files past retention, every tenth of it (at most hourly)."""
        interval = min(max(self.retention / 10, 1.0), 3600.0)
        while True:
            await trio.sleep(interval)
            _, freed = await trio.to_thread.run_sync(self._sweep_sync, time.time())
            self.used = max(self.used - freed, 0)

    def _sweep_sync(self, now: float) -> tuple[int, int]:
        """Remove the directories older than retention: the bytes of those left, and of
        those removed."""
        kept = freed = 0
        for entry in os.scandir(self.root):
            try:
                if entry.stat(follow_symlinks=False).st_mtime + self.retention < now:
                    freed += _remove_tree(Path(entry.path))
                else:
                    kept += _tree_size(Path(entry.path))
            except OSError as exc:
                log.warning("output files: %s: %s", entry.path, exc)
        return kept, freed


class Download:
    """An answer's body: ``length`` bytes read from files opened before it began. Its
    files are closed once it is read to the end, fails, or is closed (:meth:`aclose`,
    which the HTTP server calls when the answer ends), begun or not."""

    def __init__(self, length: int, handles: list[BinaryIO],
                 chunks: AsyncGenerator[bytes, None]) -> None:
        self.length = length
        self._handles = handles
        self._chunks = chunks

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            _close_all(self._handles)
            raise

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            _close_all(self._handles)

    @property
    def closed(self) -> bool:
        return all(handle.closed for handle in self._handles)


async def _read(handle: BinaryIO, size: int) -> AsyncGenerator[bytes, None]:
    """The first ``size`` bytes of an open file, in chunks read off the event loop, and
    ``size`` bytes in all whatever the file holds (the length was promised): zeros make
    up what it lacks."""
    left = size
    while left > 0:
        chunk = await trio.to_thread.run_sync(handle.read, min(CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        yield chunk
    while left > 0:
        yield bytes(min(CHUNK, left))
        left -= CHUNK


def _close_all(handles: list[BinaryIO]) -> None:
    for handle in handles:
        handle.close()


class Writer:
    """Writes one function's files as the pool collects them (its ``on_file``)."""

    def __init__(self, store: FileStore, directory: Path, wanted: int) -> None:
        self.store = store
        self.directory = directory
        self.wanted = wanted
        self.granted = store.grant(wanted)
        self.written = 0
        self.count = 0
        self._handle: BinaryIO | None = None
        self._path: str | None = None
        self.failed: str | None = None

    async def on_file(self, path: str, chunk: bytes) -> None:
        if self.failed is not None:
            return  # what comes after a failure is not kept
        try:
            if path != self._path:
                await self._close_file()
                if self.count == 0:
                    await trio.to_thread.run_sync(self.directory.mkdir)
                self._handle = await trio.to_thread.run_sync(
                    open, self.directory / str(self.count), "wb")
                self._path = path
                self.count += 1
            if chunk and self._handle is not None:
                await trio.to_thread.run_sync(self._handle.write, chunk)
                self.written += len(chunk)
        except OSError as exc:  # the disk is full, say: the function's end is still recorded
            log.warning("output files of %s: %s", self.directory.name, exc)
            self.failed = f"output files could not be kept: {exc.strerror or exc}"
            self.count -= 1 if self._path == path else 0

    def kept(self, files: list[Any]) -> list[Any]:
        """Of the files collected, those kept whole on disk."""
        return files if self.failed is None else files[:max(self.count, 0)]

    def outcome(self, result: Result) -> tuple[list[dict[str, Any]], bool, str | None]:
        """What the record says of a run's files: those kept, whether some were left out,
        and why (a failed collection or write, or the budget that granted less room)."""
        error = result.files_error
        cut = result.files_truncated or any(f.truncated for f in result.files)
        if cut and self.granted < self.wanted and \
                sum(f.size for f in result.files) >= self.granted:
            self.store.cut += 1
            error = error or "the server's room for output files (files_max_bytes) is " \
                "nearly used"
        kept = self.kept(result.files)
        listed = [{"path": f.path, "size": f.size, "sha256": f.sha256,
                   "truncated": f.truncated} for f in kept]
        return listed, result.files_truncated or len(kept) < len(result.files), \
            self.failed or error

    async def _close_file(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await trio.to_thread.run_sync(handle.close)

    async def close(self) -> None:
        """The collection is over: the room it did not use goes back to the budget."""
        with trio.CancelScope(shield=True):
            try:
                await self._close_file()
            except OSError as exc:
                self.failed = self.failed or f"output files could not be kept: {exc}"
        self.store.granted -= self.granted
        self.store.used += self.written
        if self.count:  # the directory's time is when its files were kept
            os.utime(self.directory)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _remove_tree(path: Path) -> int:
    """Remove ``path``; the bytes it held (0 when it was not there)."""
    size = _tree_size(path)
    shutil.rmtree(path, ignore_errors=True)
    return size
