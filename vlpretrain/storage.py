"""Where files live: local paths, object storage (`s3://`, `gs://`, ...) and web addresses through fsspec, and
`pipe:` commands as webdataset runs them. The loader, the shard index and remote checkpoints read and write
through these few functions only, so a new kind of storage is one fsspec protocol away.

Credentials and endpoints come from each backend's own configuration (for S3: the AWS variables and files,
`AWS_ENDPOINT_URL` for a MinIO or other S3-compatible server); nothing here knows about them.
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, Any

from vlpretrain.errors import DataError


def is_remote(url: str) -> bool:
    """Whether `url` names something other than a local file (`file:` prefixes are local)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def local_path(url: str) -> str:
    """The file system path of a local url (`file:` / `file://` prefixes removed, `~` expanded)."""
    return os.path.expanduser(url.removeprefix("file://").removeprefix("file:"))


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec file system, path within it) for a remote url; a missing backend package is a DataError saying
    which to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, str(e.name or "its fsspec backend"))
        raise DataError(f"{url}: reading {scheme}:// needs {package} (pip install 'vlpretrain[cloud]')") from None
    except ValueError as e:
        raise DataError(f"{url}: no storage backend for this address ({e})") from None


def open_stream(url: str) -> IO[bytes]:
    """A binary stream of the whole object, read front to back (shards are read once, in order)."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(url)
    # large blocks: a shard is streamed whole, so every request should fetch much of it
    return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")


def read_bytes(url: str) -> bytes | None:
    """A small file's bytes (a sidecar), or None when it does not exist."""
    if url.startswith("pipe:"):
        return None
    if not is_remote(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def parent(url: str) -> str:
    """The folder a url's file sits in (same scheme)."""
    if not is_remote(url):
        return os.path.dirname(local_path(url)) or "."
    return url.rsplit("/", 1)[0]


def join(folder: str, name: str) -> str:
    """`name` inside `folder` (same scheme)."""
    return os.path.join(folder, name) if not is_remote(folder) else posixpath.join(folder, name)


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def list_sizes(folder: str) -> dict[str, int]:
    """{file name: size in bytes} of the files directly in `folder` (one listing request for object storage);
    empty when the folder does not exist. `pipe:` and plain web addresses cannot be listed: empty."""
    if not is_remote(folder):
        try:
            with os.scandir(local_path(folder)) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
    if folder.startswith(("pipe:", "http://", "https://")):
        return {}
    fs, path = filesystem(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {basename(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def write_bytes(url: str, data: bytes) -> None:
    """Write a small file whole. Locally under a temporary name, then renamed, so no reader ever sees half of it;
    an object store makes an object visible only once its upload is complete."""
    if not is_remote(url):
        path = local_path(url)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
