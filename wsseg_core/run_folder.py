"""A run folder as one object: its layout, where it is staged, fetch and publish, atomic writes.

`--out` is a local path or a URI (`s3://bucket/run`, `file:///data/run`). A local folder is used
as it is. A URI is worked on in a local staging folder - `$WSSEG_STAGING` or the temp folder,
`/wsseg-staging/<hash of the URI>`, the same path on every node - and each output is uploaded
(`publish`) when written; what a job needs from an earlier one it fetches first (`fetch`). A job
holds one `RunFolder` and never touches the staging itself: for a local folder `fetch`, `publish`,
`mirror` and `discard_remote` do nothing.

Every file is written atomically (`wsseg_core.storage`: temp name in the same folder, then
`os.replace`), so a reader, a resumed run or an upload never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from wsseg_core import storage
from wsseg_core.storage import RemoteDir, TMP_MARKER, is_uri, join

__all__ = ["RunFolder", "StaleResultsError", "safe_name", "study_key", "sha256_file", "STAGING_ENV"]

LOG = logging.getLogger("wsseg")

#: Where URIs are staged: `$WSSEG_STAGING/wsseg-staging/<hash>` (default: the temp folder).
STAGING_ENV = "WSSEG_STAGING"

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(identifier: str) -> str:
    """A file-name-safe form of a patient or study id: it can never leave its folder.

    Separators, spaces and anything outside [A-Za-z0-9._-] become '_', and leading/trailing dots
    and underscores go (no '..', no hidden files), so `<out>/masks/<id>` stays under `<out>`.
    """
    name = _SAFE.sub("_", str(identifier)).strip("._")
    if not name:
        raise ValueError(f"identifier {identifier!r} cannot be used as a file name")
    return name


def study_key(patient_id: str, study_id: str) -> str:
    """A unique, file-name-safe key for one study: `<patient>__<study>__<hash8>`.

    `safe_name` alone is not injective ("a b" and "a_b" both become "a_b", "../../x" becomes "x"),
    and a per-study result file found under a colliding name would make a resumed run skip a study
    it never scored. The short hash of the raw ids keeps keys distinct; the readable part is for
    people. An id that has no safe form at all (e.g. "..") keeps only the hash.
    """
    def part(identifier: str) -> str:
        try:
            return safe_name(identifier)
        except ValueError:
            return "id"

    digest = hashlib.sha256(f"{patient_id}\x00{study_id}".encode()).hexdigest()[:8]
    return f"{part(patient_id)}__{part(study_id)}__{digest}"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StaleResultsError(RuntimeError):
    """A results folder holds results computed with other inputs than its record says now
    (e.g. `<out>/metrics/` with other methods, thresholds or classifier)."""


class RunFolder:
    """One run folder: where each output lives (the contract pandas users and later jobs rely on),
    the local folder jobs work in (`out`), and, for a URI, its mirror at the URI (`remote`).

    Paths are local `Path`s under `out`; `where` gives the public name (the URI's or the local
    path) of any of them. Every method that takes paths takes them absolute (under `out`) or
    relative to it.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        loc = os.fspath(location)
        if is_uri(loc):
            root = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / "wsseg-staging"
            self.out = root / hashlib.sha256(loc.encode()).hexdigest()[:12]
            self.remote: RemoteDir | None = RemoteDir(loc)
            self.location = loc
        else:
            self.out = Path(loc).absolute()
            self.remote = None
            self.location = str(self.out)

    def __repr__(self) -> str:
        staged = f", staged in {self.out}" if self.remote is not None else ""
        return f"RunFolder({self.location!r}{staged})"

    # ----------------------------------------------------------------------------------------------
    # Layout

    @property
    def cohort(self) -> Path:  # the resolved cohort with splits (manifest, Parquet)
        return self.out / "cohort.parquet"

    @property
    def classifier(self) -> Path:
        return self.out / "models" / "classifier.pt"

    @property
    def unet(self) -> Path:  # the supervised upper baseline, when one was trained
        return self.model("unet.pt")

    def model(self, filename: str) -> Path:
        """A trained network of the run: models/<filename>."""
        return self.out / "models" / filename

    @property
    def thresholds(self) -> Path:
        return self.out / "thresholds.json"

    @property
    def tune_grid(self) -> Path:
        return self.out / "tune" / "grid.parquet"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics"

    def study_metrics(self, patient_id: str, study_id: str) -> Path:
        """One study's rows: metrics/<patient>__<study>__<hash8>.parquet (see `study_key`)."""
        return self._per_study("metrics", patient_id, study_id)

    @property
    def metrics_record(self) -> Path:
        """What the rows in metrics/ were computed with; '_' so Parquet readers skip it."""
        return self.metrics / "_run.json"

    @property
    def slices(self) -> Path:  # per-slice classifier probabilities and labels, one file a study
        return self.out / "slices"

    def study_slices(self, patient_id: str, study_id: str) -> Path:
        """One study's per-slice table: slices/<patient>__<study>__<hash8>.parquet (as its rows)."""
        return self._per_study("slices", patient_id, study_id)

    def _per_study(self, folder: str, patient_id: str, study_id: str) -> Path:
        return self.out / folder / f"{study_key(patient_id, study_id)}.parquet"

    @property
    def icc(self) -> Path:
        return self.out / "icc.parquet"

    @property
    def summary(self) -> Path:
        return self.out / "summary.parquet"

    @property
    def run_json(self) -> Path:
        return self.out / "run.json"

    @property
    def ray_storage(self) -> Path:
        return self.out / "ray"

    def mask(self, method: str, patient_id: str, study_id: str) -> Path:
        """Relative to `out`: masks/<method>/<patient>/<study>.nii.gz, ids sanitised."""
        return (Path("masks") / safe_name(method.replace("+", "p")) / safe_name(patient_id)
                / f"{safe_name(study_id)}.nii.gz")

    # ----------------------------------------------------------------------------------------------
    # Local folder and URI

    @property
    def staging(self) -> Path | None:
        """The local staging folder of a URI run; None for a local run (it has no staging)."""
        return self.out if self.remote is not None else None

    def rel(self, path: str | os.PathLike) -> Path:
        """`path` relative to the run folder (absolute paths must lie under `out`)."""
        p = Path(path)
        return p.relative_to(self.out) if p.is_absolute() else p

    def where(self, path: str | os.PathLike = "") -> str:
        """The public name of an output: `<uri>/<rel>` for a URI run, the local path otherwise."""
        rel = self.rel(path).as_posix()
        return self.location if rel in ("", ".") else join(self.location, rel)

    def exists(self, path: str | os.PathLike) -> bool:
        """True where the output is present locally or at the URI."""
        rel = self.rel(path)
        return (self.out / rel).exists() or (self.remote is not None and self.remote.exists(rel))

    def fetch(self, *paths: str | os.PathLike, refresh: bool = False) -> None:
        """Make outputs of earlier jobs (files or folders of the run) present locally: download them
        from the URI where missing (or always, with `refresh`). Nothing to do for a local run."""
        if self.remote is None:
            return
        for p in paths:
            rel = self.rel(p)
            if (refresh or not (self.out / rel).exists()) and self.remote.exists(rel):
                self.remote.download(rel, self.out)

    def mirror(self, *folders: str | os.PathLike) -> None:
        """Make local folders exact copies of the URI's (what every node uploaded, nothing a dead
        writer left only here): removed, then fetched. Nothing to do for a local run."""
        if self.remote is None:
            return
        for folder in folders:
            shutil.rmtree(self.out / self.rel(folder), ignore_errors=True)
        self.fetch(*folders)

    def publish(self, *paths: str | os.PathLike) -> None:
        """Upload outputs (files or folders) to the URI, if any; paths that do not exist are skipped.
        Each upload goes to a temp name renamed into place (`storage.RemoteDir.upload`)."""
        if self.remote is None:
            return
        for p in paths:
            rel = self.rel(p)
            if (self.out / rel).exists():
                self.remote.upload(self.out, rel)

    def discard_remote(self, folder: str | os.PathLike) -> None:
        """Delete what the URI holds under `folder` (the local copy is the caller's). Nothing to do
        for a local run."""
        if self.remote is not None:
            self.remote.fs.delete_dir_contents(self.remote.path(self.rel(folder)), missing_dir_ok=True)

    # ----------------------------------------------------------------------------------------------
    # Atomic writes (then published), fingerprints, temp-file clean-up

    def write_json(self, path: str | os.PathLike, obj: Any, *, publish: bool = True) -> Path:
        """`obj` as indented JSON with sorted keys, written atomically and (`publish`) uploaded."""
        return self._write(path, lambda dst: storage.write_json(dst, obj), publish)

    def write_parquet(self, path: str | os.PathLike, data: Any, *, publish: bool = True) -> Path:
        """A DataFrame (without its index) or pyarrow Table as Parquet, atomically; (`publish`) uploaded."""
        return self._write(path, lambda dst: storage.write_parquet(dst, data), publish)

    def write_npz(self, path: str | os.PathLike, *, publish: bool = True, **arrays: Any) -> Path:
        """`np.savez(path, **arrays)`, atomically; (`publish`) uploaded."""
        return self._write(path, lambda dst: storage.write_npz(dst, **arrays), publish)

    def copy_in(self, src: str | os.PathLike, path: str | os.PathLike, *, publish: bool = True) -> Path:
        """Copy the local file `src` to `path` in the run, atomically; (`publish`) uploaded."""
        return self._write(path, lambda dst: storage.copy_file(src, dst), publish)

    def _write(self, path: str | os.PathLike, write: Callable[[Path], None], publish: bool) -> Path:
        """`write(local path)` (one of wsseg_core.storage's atomic writers), then the upload."""
        dst = self.out / self.rel(path)
        write(dst)
        if publish:
            self.publish(dst)
        return dst

    def update_thresholds(self, entries: dict[str, dict[str, Any]], **info: Any) -> Path:
        """Merge tuned entries (method -> params) and top-level `info` into the run's thresholds.json
        (`wsseg_core.thresholds.update_thresholds`, atomic) and upload it."""
        from wsseg_core.thresholds import update_thresholds

        update_thresholds(self.thresholds, entries, **info)
        self.publish(self.thresholds)
        return self.thresholds

    def sha256(self, path: str | os.PathLike) -> str:
        """The sha256 of a local file of the run (fetch it first for a URI run)."""
        return sha256_file(self.out / self.rel(path))

    def clean_temp_files(self, *folders: str | os.PathLike) -> int:
        """Remove temp files (`storage.TMP_MARKER`) that writers killed between write and rename left
        under `folders`; returns how many.

        They are hidden ('.' prefix) and never read, so this is housekeeping, not correctness.
        Assumes one writer per run folder at a time (a concurrent writer's in-flight file would go too).
        """
        n = 0
        for folder in folders:
            local = self.out / self.rel(folder)
            if local.is_dir():
                for p in local.rglob(f".*{TMP_MARKER}*"):
                    if p.is_file():
                        p.unlink(missing_ok=True)
                        n += 1
        if n:
            LOG.info("removed %d temp file(s) left by an interrupted writer", n)
        return n

    def claim_results(self, folder: str | os.PathLike, record: str | os.PathLike, fingerprint: dict,
                      overwrite: bool) -> None:
        """Start a results folder fresh (`overwrite`, or no earlier results) or check that its earlier
        results are current: `record` (a JSON file in it) must equal `fingerprint`. The record is
        then (re)written and published before any result, so every result file has its record.

        Raises:
            StaleResultsError: earlier results (`*.parquet` in `folder`) or a record exist and the
                record differs from `fingerprint` (or is missing).
        """
        local, rec = self.out / self.rel(folder), self.out / self.rel(record)
        existing = list(local.glob("*.parquet")) if local.is_dir() else []
        if overwrite and local.exists():
            LOG.info("--overwrite: removing earlier results in %s", local)
            shutil.rmtree(local)
        elif existing or rec.exists():
            old = json.loads(rec.read_text()) if rec.exists() else None
            if old != fingerprint:
                what = (f"no record of how they were computed ({self.rel(rec).as_posix()})" if old is None
                        else "they differ in " + ", ".join(k for k in fingerprint
                                                           if old.get(k) != fingerprint[k]))
                raise StaleResultsError(
                    f"{local} holds {len(existing)} per-study result file(s) from an earlier run, "
                    f"but {what}; rerun with --overwrite to discard them and score every study again")
        local.mkdir(parents=True, exist_ok=True)
        self.write_json(rec, fingerprint)
