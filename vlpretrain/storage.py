"""Where files live: local paths, object storage (`s3://`, `gs://`, ...) and web addresses through fsspec, and
`pipe:` commands as webdataset runs them. The loader, the shard index and remote checkpoints read and write
through these few functions only, so a new kind of storage is one fsspec protocol away.

Credentials and endpoints come from each backend's own configuration (for S3: the AWS variables and files,
`AWS_ENDPOINT_URL` for a MinIO or other S3-compatible server); nothing here knows about them.
"""

from __future__ import annotations

import os
import posixpath
import shutil
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
        raise DataError(_missing_backend(url, e)) from None
    except ValueError as e:
        raise DataError(f"{url}: no storage backend for this address ({e})") from None


def _missing_backend(url: str, error: ImportError) -> str:
    scheme = url.split("://", 1)[0]
    package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme)
    if package:
        return f"{url}: {scheme}:// needs {package} (pip install 'vlpretrain[cloud]')"
    return f"{url}: {scheme}:// needs its fsspec backend ({error})"


def check_writable_url(url: str) -> None:
    """Fail with one line when `url` names no storage that files can be written to: an unknown scheme, a missing
    backend package (which to install), or a read-only kind (`pipe:`, web addresses). Makes no request."""
    import fsspec

    if url.startswith(("pipe:", "http://", "https://")):
        raise DataError(f"{url}: cannot be written to (use a local path, s3://, gs:// or another fsspec store)")
    if not is_remote(url):
        return
    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except ImportError as e:
        raise DataError(_missing_backend(url, e)) from None
    except ValueError:
        raise DataError(f"{url}: no storage backend for {url.split('://', 1)[0]}:// (fsspec knows none)") from None


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


# ---- the write side (remote checkpoints) ---------------------------------------------------------------------


def _listing_fs(folder: str) -> tuple[Any, str]:
    """The file system of `folder` with its cached listings dropped: another process (or thread) may have
    written there since the last listing."""
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    return fs, path


def list_folders(folder: str) -> list[str]:
    """Names of the sub-folders directly in `folder` (prefixes, for object storage); empty when it is absent."""
    if not is_remote(folder):
        try:
            with os.scandir(local_path(folder)) as it:
                return sorted(e.name for e in it if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = _listing_fs(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(basename(e["name"]) for e in entries if e.get("type") == "directory")


def list_tree(folder: str) -> list[str]:
    """Paths (relative, `/`-separated) of every file under `folder`, sorted; empty when it is absent."""
    if not is_remote(folder):
        root = local_path(folder)
        found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
        return sorted(p.replace(os.sep, "/") for p in found)
    fs, path = _listing_fs(folder)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    prefix = path.rstrip("/") + "/"
    return sorted(p.removeprefix(prefix) for p in found if p.startswith(prefix))


def put_file(local: str | os.PathLike, url: str) -> None:
    """Copy a local file to `url` (folders made as needed); an existing file there is replaced."""
    if not is_remote(url):
        target = local_path(url)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        shutil.copyfile(local, target)
        return
    fs, path = filesystem(url)
    fs.put_file(os.fspath(local), path)


def get_file(url: str, local: str | os.PathLike) -> None:
    """Copy the file at `url` to a local path (folders made as needed)."""
    os.makedirs(os.path.dirname(os.fspath(local)) or ".", exist_ok=True)
    if not is_remote(url):
        shutil.copyfile(local_path(url), local)
        return
    fs, path = filesystem(url)
    fs.get_file(path, os.fspath(local))


def write_bytes(url: str, data: bytes) -> None:
    """Write a small file whole; a reader sees the old content or the new, never part (a local file is written
    under a temporary name and renamed; an object store's put is atomic)."""
    if not is_remote(url):
        target = local_path(url)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def remove_tree(folder: str) -> None:
    """Remove `folder` and everything in it; nothing happens when it is absent."""
    if not is_remote(folder):
        shutil.rmtree(local_path(folder), ignore_errors=True)
        return
    fs, path = _listing_fs(folder)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
