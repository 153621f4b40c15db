"""One storage layer for local paths, ``file://`` and ``s3://`` URIs.

Everything the pipeline reads or writes goes through here (fsspec; s3fs for S3). The S3 endpoint and
credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so
the same jobs run against AWS, MinIO or moto. pyarrow and Ray Data get the matching filesystem from
:func:`arrow_filesystem`.
"""
from __future__ import annotations

import os
import posixpath
import re
import tempfile
import time
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import UsageError

# Transient object-store faults (503 SlowDown, 500s, resets, slow answers) are retried with backoff, configured
# here once for every client the project uses: botocore-based clients (boto3, s3fs, MLflow's S3 artifact store)
# read the standard variables below (set before any client or Ray worker exists: jobs import this module
# first, and local Ray workers inherit the environment); pyarrow's S3 client (also what Ray Data reads through)
# gets the same attempts as its retry strategy.
MAX_ATTEMPTS = 10
os.environ.setdefault("AWS_RETRY_MODE", "standard")
os.environ.setdefault("AWS_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
# Store errors that pyarrow's S3 client gives up on although they are transient: a throttling answer's
# error body bigger than a small ranged read surfaces as INTERNAL_FAILURE ("Failed to flush response
# stream"), which its retry strategy never retries. The same list Ray Data retries its own reads on.
TRANSIENT = ("AWS Error INTERNAL_FAILURE", "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN",
             "AWS Error SERVICE_UNAVAILABLE", "AWS Error UNKNOWN (HTTP status 5")


def retrying(fn, *args, **kwargs):
    """fn(*args, **kwargs), again with exponential backoff while it fails with a transient store error."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if attempt == MAX_ATTEMPTS - 1 or not any(t in str(e) for t in TRANSIENT):
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def is_storage_uri(uri: str) -> bool:
    """A path or URI this layer reads itself (no scheme, s3://, s3a://, file://), not a tracking server's."""
    scheme = re.match(r"^([a-zA-Z][\w+.-]*):/", uri)
    return scheme is None or scheme[1] in ("s3", "s3a", "file")


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")


def redact(uri: str) -> str:
    """The URI with any user:password@ part masked: what may be printed, logged or stored."""
    return _USERINFO.sub(r"\1***@", uri)


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray workers may run elsewhere); remote URIs lose trailing '/'. A URI carrying
    credentials (a key and secret before the bucket, `user:password@`) is refused: it would be written verbatim
    into MLflow params, the night's marker, every row's heatmap_uri and error texts."""
    if is_remote(uri):
        scheme = urlparse(uri).scheme
        if scheme not in ("s3", "s3a"):
            raise UsageError(f"unsupported storage scheme {scheme!r} in {redact(uri)!r}: use a local path, file:// "
                             "or s3://")
        if _USERINFO.match(uri):
            raise UsageError(f"credentials in a storage URI are refused ({redact(uri)!r}): give them to the S3 client "
                             "through its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a profile")
        return uri.rstrip("/")
    return os.path.abspath(_strip_file(uri))


def private_dir(path: str) -> str:
    """Create (or check) a local cache folder only this user can write: created 0700; an existing one must be owned
    by this user and writable by no one else, else it is refused (in a shared temp folder another user could have
    made it first and planted weights or a model in it). Returns the path."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UsageError(f"cache folder {path} belongs to another user (uid {st.st_uid}): set its variable "
                         "(ANOPLE_MODEL_CACHE, ANOPLE_WEIGHTS_CACHE) to a folder of your own")
    if st.st_mode & 0o022:
        raise UsageError(f"cache folder {path} is writable by others (mode {oct(st.st_mode & 0o777)}): "
                         "chmod go-w it or point its variable elsewhere")
    return path


def user_temp(name: str) -> str:
    """<temp folder>/<name>-<uid>: a per-user default for a cache (never one shared, predictable path)."""
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"{name}-{uid}")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(_strip_file(base), *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URI."""
    uri = normalize(uri)
    if is_remote(uri):
        # no listing cache: pyarrow and Ray write to the same prefixes, and a stale listing would hide
        # their objects from exists/list/remove here
        fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False)
        return fs, path
    return fsspec.filesystem("file"), uri


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a URI. ``from_uri`` follows AWS_ENDPOINT_URL; a bare
    ``S3FileSystem()`` does not (it goes to the real AWS host unless given endpoint_override)."""
    uri = normalize(uri)
    if is_remote(uri):
        base, path = pafs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))  # resolves the bucket's region
        options = {"region": base.region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS)}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint)
            options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**options), path
    return pafs.LocalFileSystem(), uri


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; the parent 'folder' is created for local paths."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove_tree(uri: str) -> None:
    """Delete a prefix and everything under it; a missing prefix is fine."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(uri: str) -> list[str]:
    """Every file under a prefix, recursively, as full URIs in sorted order."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"nothing at {uri}")
    if fs.isfile(path):
        return [normalize(uri)]
    found = sorted(p for p in fs.find(path) if not fs.isdir(p))
    if is_remote(uri):
        scheme = urlparse(normalize(uri)).scheme
        return [f"{scheme}://{p}" for p in found]
    return found


def modified_time(uri: str):
    """Modification time of a file as a datetime, or None when the store does not say."""
    fs, path = filesystem(uri)
    try:
        return fs.modified(path)
    except (NotImplementedError, KeyError):
        return None


def upload_tree(local_dir: str, uri: str) -> None:
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            with open(full, "rb") as f:
                write_bytes(join(uri, rel), f.read())
