"""One writer per remote store: a lease object ``<store>.lease`` beside it.

A flock (``io.StoreLock``) cannot span machines, so a remote store is guarded by an
object holding the owner's id and an expiry time, created with an S3 conditional put
(``IfNoneMatch='*'``: the put fails if the object exists, atomically on the server).
A heartbeat thread renews it every ``ttl/3`` seconds with ``IfMatch=<its ETag>`` (the put
fails if anyone else replaced it); a writer that died stops renewing, and once its expiry
has passed the next writer takes the lease over, again with ``IfMatch`` on the stale
object's ETag, so two writers racing for a stale lease cannot both win. The loopback moto
server used by the tests (moto >= 5.1) implements both conditions on ``put_object``.

Expiry is compared with the local clock: writers' clocks must agree within the TTL
(default 60 s, ``SAM_CACHE_LEASE_TTL`` seconds). A writer that loses its lease (it
stalled longer than the TTL and another took over) is told at its next ``check``, before
it marks anything done. Stores at other fsspec URLs get the same protocol where the
filesystem is s3fs; ``memory://`` lives in one process and is guarded by an in-process
registry; other protocols (gs://, ...) have no conditional put in fsspec and are
written without a lease (a note says so on stderr).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from .signature import StoreError

DEFAULT_TTL = 60.0
_MEMORY: dict[str, str] = {}
_MEMORY_LOCK = threading.Lock()


def default_ttl() -> float:
    try:
        return max(1.0, float(os.environ.get("SAM_CACHE_LEASE_TTL", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


def lease_url(url: str) -> str:
    return str(url).rstrip("/") + ".lease"


class Lease:
    """Acquire with ``acquire()`` (StoreError if another live writer holds it), keep with
    the heartbeat, give back with ``release()``; ``check()`` raises if it was lost."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, ttl: float | None = None):
        import fsspec

        self.url = str(url)
        self.ttl = float(ttl if ttl is not None else default_ttl())
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fs, path = fsspec.core.url_to_fs(lease_url(self.url), **(storage_options or {}))
        self.path = path.rstrip("/")
        self.kind = "s3" if type(self.fs).__name__ == "S3FileSystem" else (
            "memory" if self.url.startswith("memory://") else "none")
        self.etag: str | None = None
        self.renewed = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- S3 primitives --------------------------------------------------------------
    def _split(self) -> tuple[str, str]:
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl, "store": self.url,
                           "nonce": uuid.uuid4().hex}).encode()

    def _put(self, **cond) -> str | None:
        """Conditional put; the new ETag, or None when the condition failed."""
        bucket, key = self._split()
        try:
            r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **cond)
        except Exception as e:  # botocore wraps 412 in several exception types
            if _precondition_failed(e):
                return None
            raise
        return r.get("ETag")

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease's content and ETag from one GET (so the two belong together)."""
        from fsspec.asyn import sync

        bucket, key = self._split()

        async def get():
            r = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with r["Body"] as stream:
                return await stream.read(), r.get("ETag")

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        try:
            held = json.loads(data)
        except ValueError:
            held = None
        ours = isinstance(held, dict) and {"owner", "expires"} <= set(held) and \
            str(held.get("store")).rstrip("/") == self.url.rstrip("/")
        if not ours:
            # someone else's object under our lease name: never taken over (overwritten) or deleted
            raise StoreError(f"{lease_url(self.url)}: exists and is not a writer lease of this store; nothing was "
                             "changed, move it away or use another --out")
        return held, etag

    # --- protocol -------------------------------------------------------------------
    def acquire(self) -> "Lease":
        if self.kind == "memory":
            with _MEMORY_LOCK:
                if self.url in _MEMORY:
                    raise self._busy(_MEMORY[self.url])
                _MEMORY[self.url] = self.owner
            return self
        if self.kind == "none":
            print(f"note: {self.url}: no lease on this filesystem; run one writer per store", file=sys.stderr)
            return self
        for _ in range(5):
            etag = self._put(IfNoneMatch="*")
            if etag is None:
                held, old = self._read()
                if held is None:
                    continue  # released between our put and our read: try again
                if float(held.get("expires", 0)) > time.time():
                    raise self._busy(str(held.get("owner")))
                etag = self._put(IfMatch=old)  # take over a stale lease, only if unchanged
                if etag is None:
                    continue
                print(f"note: {self.url}: took over the expired lease of {held.get('owner')}", file=sys.stderr)
            self.etag, self.renewed = etag, time.time()
            self._start_heartbeat()
            return self
        raise StoreError(f"{self.url}: could not acquire the writer lease {lease_url(self.url)}; retry")

    def _busy(self, owner: str) -> StoreError:
        return StoreError(f"{self.url}: another process is writing this store (lease {lease_url(self.url)} held by "
                          f"{owner}); wait for it to finish (a dead writer's lease expires after {self.ttl:g} s) "
                          "or use another --out")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="store-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as e:  # a network blip: try again next beat, the TTL has slack
                print(f"note: {self.url}: lease renewal failed ({e}); retrying", file=sys.stderr)
                continue
            if etag is None:
                self.lost = "another writer took the lease over"
                return
            self.etag, self.renewed = etag, time.time()

    def check(self) -> None:
        """Raise StoreError if the lease was lost (so nothing more is marked done). When the
        last renewal is older than most of the TTL (a stalled heartbeat), ask the server."""
        if self.kind == "s3" and not self.lost and self.etag and time.time() - self.renewed > self.ttl * 2 / 3:
            _, etag = self._read()
            if etag != self.etag:
                self.lost = "its lease expired and another writer took it over"
        if self.lost:
            raise StoreError(f"{self.url}: lost the writer lease ({self.lost}); this run stopped, the other "
                             "writer goes on")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.kind == "memory":
            with _MEMORY_LOCK:
                if _MEMORY.get(self.url) == self.owner:
                    del _MEMORY[self.url]
            return
        if self.etag is None or self.lost:
            return
        bucket, key = self._split()
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except Exception as e:
            if not _precondition_failed(e) and not isinstance(e, FileNotFoundError):
                raise
        self.etag = None


def _precondition_failed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    return "PreconditionFailed" in text or "412" in text or code in ("PreconditionFailed", "412") or \
        "At least one of the pre-conditions" in text


__all__ = ["DEFAULT_TTL", "Lease", "default_ttl", "lease_url"]
