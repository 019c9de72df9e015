"""Files behind a local path or a URI that pyarrow understands (`file://`, `s3://`, `gs://`, ...).

On a cluster the cohort and the run folder live in object storage that every node reads; on a
laptop they are plain paths. Everything here takes either. Volumes are read straight from the URI
into memory (`read_bytes`); a run folder given as a URI is worked on in a local staging folder and
copied up file by file (`RemoteDir`), each upload to a temp name renamed into place, so a reader of
the remote folder never sees half a file.

A URI's path part must be percent-encoded (`file:///data/my%20cohort`), as URIs are; a raw space is
accepted too and encoded here, because people paste paths with spaces.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import quote

import pyarrow.fs as pafs

__all__ = ["is_uri", "filesystem_and_path", "read_bytes", "exists", "is_dir", "list_dir", "join",
           "write_text", "write_json", "RemoteDir"]


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (file, s3, gs, hdfs, ...), False for a local path."""
    return "://" in os.fspath(location)


def filesystem_and_path(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and the path within it, for a URI or a local path."""
    loc = os.fspath(location)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), os.path.abspath(loc)
    try:
        return pafs.FileSystem.from_uri(loc)
    except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid for unencoded characters
        scheme, rest = loc.split("://", 1)
        return pafs.FileSystem.from_uri(f"{scheme}://{quote(rest, safe='/:@%?&=+,;~')}")


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file (a NIfTI volume, a manifest) as bytes.

    Raises:
        FileNotFoundError: nothing at `location`.
        OSError: the storage could not be read.
    """
    fs, path = filesystem_and_path(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem_and_path(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    fs, path = filesystem_and_path(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(location: str | os.PathLike) -> list[tuple[str, bool]]:
    """(name, is_directory) of the entries directly under `location`, sorted by name."""
    fs, path = filesystem_and_path(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a URI (posix separators) or a local path."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(location, *parts)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (anything else as its str), written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@dataclass
class RemoteDir:
    """A run folder at a URI, mirrored from/to a local staging folder.

    `upload` copies one local file under the staging root to the same relative path under the URI
    (temp name, then rename); `download` copies the other way. Relative paths use '/'.
    """

    uri: str
    fs: pafs.FileSystem = field(init=False, repr=False)
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, self.base = filesystem_and_path(self.uri)
        self.base = self.base.rstrip("/")

    def path(self, rel: str | os.PathLike) -> str:
        return str(PurePosixPath(self.base) / PurePosixPath(Path(rel).as_posix()))

    def exists(self, rel: str | os.PathLike) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def upload(self, local_root: Path, rel: str | os.PathLike) -> None:
        """Copy `local_root/rel` (a file, or every file of a folder) to `<uri>/rel`."""
        src = Path(local_root) / rel
        if src.is_dir():
            for p in sorted(src.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    self.upload(local_root, p.relative_to(local_root))
            return
        dst = self.path(rel)
        self.fs.create_dir(str(PurePosixPath(dst).parent), recursive=True)
        tmp = str(PurePosixPath(dst).parent / f".{PurePosixPath(dst).name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(src, "rb") as f, self.fs.open_output_stream(tmp, compression=None) as out:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
            self.fs.move(tmp, dst)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except Exception:  # noqa: BLE001 - the temp may not exist; the first error matters
                pass
            raise

    def files(self, rel: str | os.PathLike = "") -> Iterator[str]:
        """Relative paths of every (non-hidden) file under `<uri>/rel`."""
        root = self.path(rel) if str(rel) else self.base
        if self.fs.get_file_info(root).type != pafs.FileType.Directory:
            return
        for info in self.fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type == pafs.FileType.File and not info.base_name.startswith("."):
                yield str(PurePosixPath(info.path).relative_to(self.base))

    def download(self, rel: str | os.PathLike, local_root: Path) -> int:
        """Copy `<uri>/rel` (a file or a folder) to `local_root/rel`; returns the files copied.

        Each file is written to a temp name and renamed, like every local output.
        """
        if self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File:
            rels = [Path(rel).as_posix()]
        else:
            rels = list(self.files(rel))
        for r in rels:
            dst = Path(local_root) / r
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with self.fs.open_input_stream(self.path(r), compression=None) as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                os.replace(tmp, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return len(rels)
