"""Where stores live: local folders or fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://``)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
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


def open_store(url: str | os.PathLike, *, read_only: bool, storage_options: dict[str, Any] | None = None):
    """A zarr Store for a local path or an fsspec URL."""
    if is_remote(url):
        return FsspecStore.from_url(str(url), storage_options=storage_options or {}, read_only=read_only)
    return LocalStore(local_path(url), read_only=read_only)


def exists(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        return fs.exists(path.rstrip("/") + "/zarr.json")
    return (local_path(url) / "zarr.json").exists()


def remove(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    p = local_path(url)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def open_group(url: str | os.PathLike, mode: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    store = open_store(url, read_only=(mode == "r"), storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except FileNotFoundError as e:
        raise StoreError(f"{url}: no feature store there; run `pipeline extract ... --out {url}` first") from e


def remove_partials(url: str | os.PathLike) -> int:
    """Delete temporary files a killed writer left behind (zarr writes ``*.partial`` then
    renames). Returns how many were removed. Local stores only."""
    if is_remote(url):
        return 0
    n = 0
    for p in local_path(url).rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


_HELD: "weakref.WeakSet[StoreLock]" = weakref.WeakSet()


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
    the kernel releases it when the process dies (even by SIGKILL). Remote stores have
    no lock; run one writer per remote store (dask partitions write disjoint shards)."""

    def __init__(self, url: str | os.PathLike):
        self.path = None if is_remote(url) else Path(str(local_path(url)).rstrip("/") + ".lock")
        self.fd: int | None = None
        self.url = url

    def acquire(self) -> "StoreLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None
