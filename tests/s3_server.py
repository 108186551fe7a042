"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, spoken to over
HTTP by s3fs (no client mock)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest


@contextlib.contextmanager
def moto_s3(*buckets: str, **env: str) -> Iterator[tuple[str, dict, object]]:
    """(endpoint URL, storage options, s3fs filesystem) of a fresh server holding ``buckets``;
    ``env`` sets extra environment variables for its lifetime."""
    import s3fs
    from moto import server as moto_server

    mp = pytest.MonkeyPatch()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        mp.setenv(k, "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    for k, v in env.items():
        mp.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for bucket in buckets:
            fs.mkdir(bucket)
        yield endpoint, {"client_kwargs": {"endpoint_url": endpoint}}, fs
    finally:
        server.stop()
        mp.undo()
