"""Where stores live: local folders or fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://``)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import weakref
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from .signature import StoreError


def is_remote(url: str | os.PathLike) -> bool:
    s = str(url)
    return "://" in s and not s.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = str(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


# Durability. zarr's LocalStore writes a temporary file and renames it: atomic, but the
# bytes and the rename may still sit in the page cache when the next write (``done``,
# ``complete: true``) lands, so a power cut could leave a sample marked done whose shard
# is empty. Every key written through a writable local store is therefore fsynced, file
# then folder, before ``set`` returns; zarr writes keys in program order, so a done flag
# is only ever written after the shard it describes is on disk. Remote (fsspec) object
# puts are durable when they return. ``benchmarks/bench_extract.py`` section 8 measures
# the cost; ``durability(False)`` turns it off (benchmarks only).
_FSYNC = {"enabled": True}


@contextlib.contextmanager
def durability(enabled: bool):
    """Temporarily turn fsync of local store writes on or off (benchmarks)."""
    before = _FSYNC["enabled"]
    _FSYNC["enabled"] = enabled
    try:
        yield
    finally:
        _FSYNC["enabled"] = before


def fsync_path(path: str | os.PathLike) -> None:
    """fsync the file ``path`` and then its folder (so the rename that made it is on disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class DurableLocalStore(LocalStore):
    """LocalStore whose ``set`` returns only after the key's bytes and rename are on disk."""

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        await super()._set(key, value, exclusive=exclusive)
        if _FSYNC["enabled"]:
            import asyncio

            await asyncio.to_thread(fsync_path, self.root / key)

    def set_sync(self, key: str, value) -> None:
        super().set_sync(key, value)
        if _FSYNC["enabled"]:
            fsync_path(self.root / key)


def open_store(url: str | os.PathLike, *, read_only: bool, storage_options: dict[str, Any] | None = None):
    """A zarr Store for a local path or an fsspec URL (local writable stores are durable)."""
    if is_remote(url):
        return FsspecStore.from_url(str(url), storage_options=storage_options or {}, read_only=read_only)
    if read_only:
        return LocalStore(local_path(url), read_only=True)
    return DurableLocalStore(local_path(url), read_only=False)


def exists(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        return fs.exists(path.rstrip("/") + "/zarr.json")
    return (local_path(url) / "zarr.json").exists()


def open_group(url: str | os.PathLike, mode: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    store = open_store(url, read_only=(mode == "r"), storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except FileNotFoundError as e:
        raise StoreError(f"{url}: no feature store there; run `pipeline extract ... --out {url}` first") from e


_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")


def is_partial(name: str) -> bool:
    """A temporary file of zarr's LocalStore (``<key stem>.<uuid4 hex>.partial``)."""
    return _PARTIAL.fullmatch(name) is not None


def remove_partials(url: str | os.PathLike) -> int:
    """Delete temporary files a killed writer left behind (zarr writes ``<name>.<uuid>.partial``
    then renames). Returns how many were removed. Local stores only."""
    if is_remote(url):
        return 0
    n = 0
    for p in local_path(url).rglob("*.partial"):
        if is_partial(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


_HELD: "weakref.WeakSet[StoreLock | FolderLock]" = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the lock descriptor: a flock
    lives as long as any process holds the descriptor, so an orphaned worker of a killed
    writer would otherwise keep the store locked until it notices its parent is gone."""
    for lock in list(_HELD):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class StoreLock:
    """Exclusive writer lock: ``<store>.lock`` beside a local store, held with flock so
    the kernel releases it when the process dies (even by SIGKILL). Remote stores use a
    lease object instead (``cache.lease``; see ``writer_lock``)."""

    def __init__(self, url: str | os.PathLike):
        self.path = None if is_remote(url) else Path(str(local_path(url)).rstrip("/") + ".lock")
        self.fd: int | None = None
        self.url = url

    def acquire(self) -> "StoreLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._refuse_foreign()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.url}: another process is writing this store (lock {self.path}); "
                "wait for it to finish or use another --out"
            ) from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder unlinked it between our open and flock
            os.close(fd)
            return self.acquire()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _HELD.add(self)
        return self

    def _refuse_foreign(self) -> None:
        """The lock file holds what ``acquire`` writes (a pid and a newline) or nothing (a
        writer killed between creating and writing it); anything else there is the user's."""
        if not os.path.lexists(self.path):
            return
        if not self.path.is_file() or self.path.is_symlink():
            raise StoreError(f"{self.path}: exists and is not a store lock of this project; nothing was changed, "
                             "move it away or choose another --out")
        try:
            with open(self.path, "rb") as f:
                head = f.read(24)
        except OSError:
            return
        if head and not re.fullmatch(rb"[0-9]{1,20}\n", head):
            raise StoreError(f"{self.path}: exists and is not a store lock of this project; nothing was changed, "
                             "move it away or choose another --out")

    def check(self) -> None:
        """A local flock cannot be lost while the process lives."""

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


class FolderLock:
    """Exclusive flock on a folder itself, for the one process writing into it (a training
    run): no lock file is added, and the kernel drops it when the process dies (even by
    SIGKILL). ``acquire`` is False while another process holds it; on a file system without
    flock (some network mounts) it holds nothing and is True, so the work goes on unguarded
    rather than not at all."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                return False
            if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            return True
        self.fd = fd
        _HELD.add(self)
        return True

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def writer_lock(url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
    """The one-writer guard of a store, acquired: a flock beside a local store, a lease
    object beside a remote one (``cache.lease``)."""
    if is_remote(url):
        from .lease import Lease

        return Lease(str(url), storage_options).acquire()
    return StoreLock(url).acquire()
