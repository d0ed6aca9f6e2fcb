"""An S3 on 127.0.0.1 for the tests: moto's server, reached through s3fs as a real bucket would be.

The endpoint and dummy credentials go into the environment before Ray starts, so Ray's workers
(img2dataset's downloads, the shard writers) find the same store the way a cluster's nodes do:
AWS_ENDPOINT_URL, which botocore (under s3fs and aiobotocore) honours. The shared AWS config files
and the instance metadata service are switched off, so nothing here can reach anything but
127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "capfilt-test",
    "AWS_SECRET_ACCESS_KEY": "capfilt-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 on a free port of 127.0.0.1, point the environment at it; yield its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Anything that could point botocore elsewhere goes: service-specific endpoints, a flag that
    # ignores AWS_ENDPOINT_URL, a profile, a session token.
    elsewhere = [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ]
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL", *elsewhere]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    for key in elsewhere:
        os.environ.pop(key, None)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # one made before has no endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_bucket() -> str:
    """A fresh, empty bucket; its name."""
    name = f"capfilt-{uuid.uuid4().hex[:12]}"
    s3().mkdir(name)
    return name


def s3() -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def upload(local: Path, uri: str) -> str:
    s3().put_file(str(local), uri.removeprefix("s3://"))
    return uri
