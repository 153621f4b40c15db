"""One storage layer for local paths, ``file://`` and ``s3://`` URIs.

Everything the pipeline reads or writes goes through here (fsspec; s3fs for S3). The S3 endpoint and
credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so
the same jobs run against AWS, MinIO or moto. pyarrow and Ray Data get the matching filesystem from
:func:`arrow_filesystem`.
"""
from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import UsageError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray workers may run elsewhere); remote URIs lose trailing '/'."""
    if is_remote(uri):
        scheme = urlparse(uri).scheme
        if scheme not in ("s3", "s3a"):
            raise UsageError(f"unsupported storage scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
        return uri.rstrip("/")
    return os.path.abspath(_strip_file(uri))


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
        return pafs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))
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
