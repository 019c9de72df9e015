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

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import quote

import pyarrow.fs as pafs

__all__ = ["is_uri", "filesystem_and_path", "read_bytes", "exists", "is_dir", "list_dir", "join",
           "TMP_MARKER", "temp_name", "atomic_path", "write_bytes", "write_text", "write_json",
           "write_parquet", "write_npz", "write_nifti", "copy_file", "RemoteDir"]


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


# --------------------------------------------------------------------------------------------------
# Atomic writes: every output is written to a temp name in its own folder, then renamed into place
# (os.replace is atomic within one file system), so a reader, a resumed run or an upload never sees
# half a file, and a failed write removes its temp file.

#: In every temp name: hidden ('.' first, so pyarrow, the uploader and `analyze` skip it) and
#: recognisable, so a resumed run can delete what a killed writer left (jobs.score_cohort).
TMP_MARKER = ".tmp-"


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh hidden temp name next to `path`: `.<name>.tmp-<pid>-<random><suffix>`. The random
    part keeps two threads of one process apart; `suffix` is for writers that choose a format by
    the name's ending (nibabel: `.nii.gz` is gzipped)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to `path` (its folder created) to write to; when the block ends
    normally the temp file replaces `path`, when it raises (Ctrl-C too) the temp file is deleted
    and `path` is left as it was.

        with atomic_path(out / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; after a failure, the partial file


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` to `path` (a local path or a URI), atomically."""
    if is_uri(path):
        fs, p = filesystem_and_path(path)
        fs.create_dir(str(PurePosixPath(p).parent), recursive=True)
        with _remote_atomic_stream(fs, p) as out:
            out.write(data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically: readers never see half a file."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (anything else as its str), written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, data: Any) -> None:
    """A pandas DataFrame (without its index) or a pyarrow Table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        if hasattr(data, "to_parquet"):
            data.to_parquet(tmp, index=False)
        else:
            import pyarrow.parquet as pq

            pq.write_table(data, tmp)


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """`np.savez(path, **arrays)`, atomically (uncompressed, like np.savez)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz"
        np.savez(f, **arrays)


def write_nifti(path: str | os.PathLike, img: Any) -> None:
    """A nibabel image to `path` (`.nii.gz` gzipped, `.nii` not: the temp name keeps the ending),
    atomically."""
    import nibabel as nib

    name = Path(path).name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    with atomic_path(path, suffix) as tmp:
        nib.save(img, str(tmp))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file `src` to `dst`, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def _remote_atomic_stream(fs: pafs.FileSystem, dst: str) -> Iterator[Any]:
    """An output stream to a temp name next to `dst` on `fs` (object storage), moved to `dst` when
    the block ends normally and deleted when it raises."""
    tmp = str(PurePosixPath(dst).parent / f".{PurePosixPath(dst).name}{TMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_output_stream(tmp, compression=None) as out:
            yield out
        fs.move(tmp, dst)
    except BaseException:
        with contextlib.suppress(Exception):  # the temp may not exist; the first error matters
            fs.delete_file(tmp)
        raise


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
        with open(src, "rb") as f, _remote_atomic_stream(self.fs, dst) as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)

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
            with atomic_path(dst) as tmp, \
                    self.fs.open_input_stream(self.path(r), compression=None) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        return len(rels)
