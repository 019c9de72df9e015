"""Cohort I/O: study references, loading and validation, weak labels, subject-level splits."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from scipy import ndimage

from wsseg_core import storage
from wsseg_core.storage import is_uri, read_bytes

logger = logging.getLogger(__name__)


class StudyError(Exception):
    """Bad input for one study: names the file and the problem.

    The jobs catch exactly this type and turn it into a ``status = "failed"`` row.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across Ray workers
        return (StudyError, (self.path, self.problem))


@dataclass(frozen=True)
class StudyRef:
    """Where one study's files are; paths are absolute (or URIs), ``seg_path`` None if unlabeled."""

    patient_id: str
    study_id: str
    suv_path: str
    ct_path: str
    seg_path: str | None
    split: str | None = None
    diagnosis: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Cohort discovery and manifests
# --------------------------------------------------------------------------------------------------

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("patient_id", "study_id", "suv_path", "ct_path", "seg_path")

# autoPET file stems; ``.nii.gz`` is the layout's own suffix, plain ``.nii`` is accepted as well.
_SUV_STEM, _CT_STEM, _SEG_STEM = "SUV", "CTres", "SEG"


def _is_hidden(name: str) -> bool:
    # Dot entries are OS litter (.DS_Store) or our own in-flight temp files, never studies.
    return name.startswith(".")


def _find_image(study_dir: str, files: set[str], stem: str) -> tuple[str, bool]:
    """The image ``stem`` among a study folder's ``files`` and whether it exists.

    When absent, the expected ``.nii.gz`` location is returned so that a later load fails naming it.
    """
    for suffix in (".nii.gz", ".nii"):
        if f"{stem}{suffix}" in files:
            return storage.join(study_dir, f"{stem}{suffix}"), True
    return storage.join(study_dir, f"{stem}.nii.gz"), False


def discover_cohort(root: str | os.PathLike) -> list[StudyRef]:
    """Find all studies under an autoPET NIfTI tree ``<root>/<patient>/<study>/{SUV,CTres,SEG}.nii.gz``.

    ``root`` is a local folder or a URI (``s3://bucket/autoPET``, ``file:///data/autoPET``).
    ``patient_id`` is the patient folder name, ``study_id`` the study folder name (which may contain
    spaces). ``seg_path`` is None where SEG is absent (unlabeled study). A study folder lacking SUV or
    CTres is still returned, with the missing path pointing at the expected file, so that
    :func:`load_study` fails for that one study with a :class:`StudyError` naming the file; the cohort
    is never silently shrunk. Sorted by (patient_id, study_id); local paths are absolute.

    Raises:
        StudyError: ``root`` does not exist, is not a folder, or holds no study folders.
    """
    root_s = os.fspath(root) if storage.is_uri(root) else os.path.abspath(os.fspath(root))
    if not storage.exists(root_s):
        raise StudyError(root_s, "cohort folder does not exist")
    if not storage.is_dir(root_s):
        raise StudyError(root_s, "cohort source is not a folder (expected <root>/<patient>/<study>/)")
    refs: list[StudyRef] = []
    for patient, patient_is_dir in storage.list_dir(root_s):
        if not patient_is_dir or _is_hidden(patient):
            continue
        patient_dir = storage.join(root_s, patient)
        studies = [n for n, d in storage.list_dir(patient_dir) if d and not _is_hidden(n)]
        if not studies:
            logger.warning("%s: patient folder holds no study folders; skipped", patient_dir)
            continue
        for study in studies:
            study_dir = storage.join(patient_dir, study)
            files = {n for n, d in storage.list_dir(study_dir) if not d}
            suv, suv_ok = _find_image(study_dir, files, _SUV_STEM)
            ct, ct_ok = _find_image(study_dir, files, _CT_STEM)
            seg, seg_ok = _find_image(study_dir, files, _SEG_STEM)
            missing = [os.path.basename(p) for p, ok in ((suv, suv_ok), (ct, ct_ok)) if not ok]
            if missing:
                logger.warning("%s: missing %s; the study will fail at load", study_dir,
                               ", ".join(missing))
            refs.append(StudyRef(patient_id=patient, study_id=study, suv_path=suv, ct_path=ct,
                                 seg_path=seg if seg_ok else None))
    if not refs:
        raise StudyError(root_s, "no studies found (expected <root>/<patient>/<study>/SUV.nii.gz)")
    refs.sort(key=lambda r: (r.patient_id, r.study_id))
    return refs


def _cell(value: object) -> str | None:
    """A manifest cell as a stripped string, None for empty / NaN / missing."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # array-like cells: not a scalar NA
        pass
    s = str(value).strip()
    return s or None


def _resolve(base: str, p: str) -> str:
    # URIs are passed through untouched; relative paths are relative to the manifest's folder (local
    # or URI) so a manifest can travel together with its data.
    if storage.is_uri(p):
        return p
    if storage.is_uri(base):
        return storage.join(base, p)
    p = os.path.expanduser(p)
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(p)


def read_manifest(path: str | os.PathLike) -> list[StudyRef]:
    """Read a CSV or Parquet manifest with columns ``patient_id, study_id, suv_path, ct_path, seg_path``
    (optional ``split`` in {train, val, test}, ``diagnosis``).

    Relative paths resolve against the manifest's folder; an empty ``seg_path`` means unlabeled.
    File existence is not checked here: a missing file fails that one study at load time.
    Rows keep the manifest's order.

    Raises:
        StudyError(manifest, problem): unreadable file, missing required column(s), empty required
            cell, duplicate (patient_id, study_id), unknown split, or a patient whose studies are given
            different splits.
    """
    mpath = os.fspath(path) if storage.is_uri(path) else os.path.abspath(os.fspath(path))
    suffix = Path(mpath).suffix.lower()
    try:
        if suffix not in (".csv", ".parquet", ".pq"):
            raise StudyError(mpath, f"unknown manifest type {suffix!r} (expected .csv or .parquet)")
        try:
            raw = io.BytesIO(storage.read_bytes(mpath))
        except FileNotFoundError:
            raise StudyError(mpath, "manifest file not found") from None
        if suffix == ".csv":
            # dtype=str keeps IDs such as "0007" intact instead of turning them into integers.
            df = pd.read_csv(raw, dtype=str)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(raw)
        else:
            raise StudyError(mpath, f"unknown manifest type {suffix!r} (expected .csv or .parquet)")
    except StudyError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as e:
        raise StudyError(mpath, f"cannot read manifest: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise StudyError(mpath, f"missing required column(s): {', '.join(missing)} "
                                f"(found: {', '.join(df.columns) or 'none'})")
    if len(df) == 0:
        raise StudyError(mpath, "manifest holds no studies")
    base = mpath.rsplit("/", 1)[0] if storage.is_uri(mpath) else os.path.dirname(mpath)
    has_split = "split" in df.columns
    has_diag = "diagnosis" in df.columns
    refs: list[StudyRef] = []
    seen: dict[tuple[str, str], int] = {}
    duplicates: list[str] = []
    for i, row in enumerate(df.to_dict(orient="records"), start=1):
        vals = {c: _cell(row[c]) for c in MANIFEST_COLUMNS}
        for c in ("patient_id", "study_id", "suv_path", "ct_path"):
            if vals[c] is None:
                raise StudyError(mpath, f"row {i}: empty {c}")
        key = (vals["patient_id"], vals["study_id"])
        if key in seen:
            duplicates.append(f"{key[0]}/{key[1]} (rows {seen[key]} and {i})")
        else:
            seen[key] = i
        split = _cell(row["split"]) if has_split else None
        if split is not None:
            split = split.lower()
            if split not in SPLITS:
                raise StudyError(mpath, f"row {i}: split {split!r} not in {{train, val, test}}")
        refs.append(StudyRef(
            patient_id=vals["patient_id"],
            study_id=vals["study_id"],
            suv_path=_resolve(base, vals["suv_path"]),
            ct_path=_resolve(base, vals["ct_path"]),
            seg_path=_resolve(base, vals["seg_path"]) if vals["seg_path"] else None,
            split=split,
            diagnosis=_cell(row["diagnosis"]) if has_diag else None,
        ))
    if duplicates:
        shown = "; ".join(duplicates[:5]) + (f"; ... ({len(duplicates)} in all)"
                                             if len(duplicates) > 5 else "")
        raise StudyError(mpath, f"duplicate (patient_id, study_id): {shown}")
    try:
        _given_splits(refs)
    except StudyError as e:
        raise StudyError(mpath, e.problem) from None
    return refs


def load_cohort(source: str | os.PathLike) -> list[StudyRef]:
    """A folder (autoPET layout, :func:`discover_cohort`) or a ``.csv`` / ``.parquet`` manifest
    (:func:`read_manifest`), as a local path or a URI (``s3://``, ``file://``, ...)."""
    p = os.fspath(source) if storage.is_uri(source) else os.path.abspath(os.fspath(source))
    if storage.is_dir(p):
        return discover_cohort(p)
    if Path(p).suffix.lower() in (".csv", ".parquet", ".pq"):
        return read_manifest(p)
    if not storage.exists(p):
        raise StudyError(p, "cohort source does not exist (expected a folder or a .csv/.parquet manifest)")
    raise StudyError(p, "cohort source is neither a folder nor a .csv/.parquet manifest")


# --------------------------------------------------------------------------------------------------
# Subject-level splits
# --------------------------------------------------------------------------------------------------

def _given_splits(refs: Sequence[StudyRef]) -> dict[str, str]:
    """patient_id -> split for patients with a split already given; conflicting splits are an error."""
    given: dict[str, set[str]] = {}
    for r in refs:
        if r.split is not None:
            if r.split not in SPLITS:
                raise StudyError(f"{r.patient_id}/{r.study_id}",
                                 f"split {r.split!r} not in {{train, val, test}}")
            given.setdefault(r.patient_id, set()).add(r.split)
    conflicts = {pid: s for pid, s in given.items() if len(s) > 1}
    if conflicts:
        pid, s = next(iter(sorted(conflicts.items())))
        raise StudyError(f"patient {pid}", f"studies of one patient are given different splits "
                                           f"{sorted(s)} ({len(conflicts)} patient(s) affected)")
    return {pid: next(iter(s)) for pid, s in given.items()}


def _unit_hash(patient_id: str, seed: int) -> float:
    # A keyed hash per patient, not a shuffle: each patient's rank within its stratum depends on
    # nothing but (seed, patient_id), so a new patient slots in between existing ones and only the
    # few patients next to a quota cut move (see assign_splits).
    digest = hashlib.sha256(f"wsseg-split\x00{seed}\x00{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# Patient strata of the split: a patient with tumour in any labelled study, a labelled patient
# whose every SEG is empty, and a patient with no SEG at all (scored for MTV only, never trained on).
STRATA: tuple[str, ...] = ("tumour", "tumour-free", "unlabelled")

# Fractional parts closer than this count as equal (0.2 * 15 is 3.0000000000000004 in floats).
_QUOTA_EPS = 1e-9


def _normalised_fractions(fractions: Sequence[float]) -> np.ndarray:
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (len(SPLITS),) or not np.all(np.isfinite(fr)) or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers (train, val, test), "
                         f"got {tuple(fractions)!r}")
    return fr / fr.sum()


def split_quotas(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> tuple[int, int, int]:
    """Patients per split (train, val, test) for ``n`` patients: each within one of ``n * fraction``.

    Largest-remainder rounding (Hamilton): every split gets ``floor(n * f)``, and the patients left
    over go to the largest fractional parts, ties in split order (train, val, test). When ``n >= 5``
    and validation has a non-zero fraction, validation gets at least one patient (taken from the
    largest split), so a checkpoint and thresholds are never chosen on training data for want of one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fr = _normalised_fractions(fractions)
    exact = n * fr
    base = np.floor(exact + _QUOTA_EPS).astype(int)
    rem = np.where(exact - base > _QUOTA_EPS, exact - base, 0.0)
    for j in sorted(range(len(SPLITS)), key=lambda j: (-round(rem[j] / _QUOTA_EPS), j))[
            : n - int(base.sum())]:
        base[j] += 1
    val = SPLITS.index("val")
    if n >= 5 and fr[val] > 0 and base[val] == 0:
        base[int(np.argmax(base))] -= 1
        base[val] += 1
    return tuple(int(b) for b in base)  # type: ignore[return-value]


def _stratum_quotas(sizes: Sequence[int], quotas: Sequence[int]) -> list[list[int]]:
    """Split the overall ``quotas`` (per split) among strata of ``sizes`` patients.

    Controlled rounding of the proportional table ``a[k][j] = sizes[k] * quotas[j] / sum(sizes)``:
    each cell is rounded down or up, rows sum to ``sizes`` and columns to ``quotas`` exactly, so
    every stratum is within one patient of its share and the total is exactly ``quotas``. A
    rounding with these sums always exists (the table of fractional parts is a point of a
    transportation polytope, whose vertices are integer); among them the one whose rounded-up cells
    have the largest fractional parts is taken, ties by enumeration order (deterministic).
    """
    n = int(sum(sizes))
    if n == 0:
        return [[0] * len(quotas) for _ in sizes]
    a = np.array([[s * q / n for q in quotas] for s in sizes], dtype=float)
    base = np.floor(a + _QUOTA_EPS).astype(int)
    frac = np.clip(a - base, 0.0, None)
    need_row = np.asarray(sizes) - base.sum(axis=1)
    need_col = np.asarray(quotas) - base.sum(axis=0)
    cells = [(k, j) for k in range(len(sizes)) for j in range(len(quotas)) if frac[k, j] > _QUOTA_EPS]
    best, best_score = None, -1.0
    # At most 3 strata x 3 splits: 2^9 subsets, each checked in microseconds.
    for mask in range(1 << len(cells)):
        up = np.zeros_like(base)
        for b, (k, j) in enumerate(cells):
            if mask >> b & 1:
                up[k, j] = 1
        if np.array_equal(up.sum(axis=1), need_row) and np.array_equal(up.sum(axis=0), need_col):
            score = float((frac * up).sum())
            if score > best_score + _QUOTA_EPS:
                best, best_score = up, score
    if best is None:  # cannot happen (see above); fail loudly rather than return wrong counts
        raise RuntimeError(f"no controlled rounding for strata {list(sizes)}, quotas {list(quotas)}")
    return (base + best).tolist()


def seg_has_tumour(ref: StudyRef) -> bool | None:
    """Whether a study's SEG marks any voxel: None when the study has no SEG (unlabelled).

    A SEG that cannot be read counts as tumour-free here, with a warning; the study itself fails
    with a :class:`StudyError` when it is loaded.
    """
    if ref.seg_path is None:
        return None
    try:
        return bool(np.any(_read_nifti(ref.seg_path, "SEG", as_float=False).data > 0))
    except (StudyError, OSError) as e:  # OSError: a URI store that fails mid-read
        logger.warning("%s: SEG unreadable while splitting (%s); counted as tumour-free",
                       ref.seg_path, getattr(e, "problem", e))
        return False


def patient_strata(refs: Sequence[StudyRef],
                   has_tumour: Callable[[StudyRef], bool | None] = seg_has_tumour,
                   threads: int = 8) -> dict[str, str]:
    """patient_id -> stratum in :data:`STRATA`, from ``has_tumour`` of every labelled study.

    ``has_tumour`` defaults to reading the SEG (:func:`seg_has_tumour`), on ``threads`` threads
    (gzip inflation releases the GIL).
    """
    labelled = [r for r in refs if r.seg_path is not None]
    if threads > 1 and len(labelled) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(labelled))) as pool:
            flags = list(pool.map(has_tumour, labelled))
    else:
        flags = [has_tumour(r) for r in labelled]
    strata = {r.patient_id: "unlabelled" for r in refs}
    for r, f in zip(labelled, flags):
        if f:
            strata[r.patient_id] = "tumour"
        elif strata[r.patient_id] == "unlabelled":
            strata[r.patient_id] = "tumour-free"
    return strata


def assign_splits(refs: Sequence[StudyRef], seed: int = 0,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2),
                  has_tumour: Callable[[StudyRef], bool | None] = seg_has_tumour) -> list[StudyRef]:
    """Give every study a split in {train, val, test}, at patient level, stratified by tumour.

    - A split already on a ref (manifest-given) wins and is applied to the same patient's other
      studies; only the patients it leaves open are placed below.
    - Open patients fall into :data:`STRATA` (:func:`patient_strata`; ``has_tumour`` reads SEG by
      default). The labelled patients (tumour + tumour-free) get :func:`split_quotas` of
      ``fractions``: each split within one patient of its fraction, and validation non-empty from 5
      labelled patients on. Those quotas are shared between the two strata by controlled rounding
      (:func:`_stratum_quotas`), so each stratum is within one patient of its share too. Unlabelled
      patients get their own quotas.
    - Within a stratum, patients are ranked by a seeded hash of ``patient_id`` and cut at the
      quotas: train first, then val, then test. The result depends on the set of patients (and
      their strata) and ``seed`` only, not on the order of ``refs``. Adding a patient shifts the
      cuts by at most one place each, so only patients next to a cut move (README: splits).

    Returns new refs in the input order.

    Raises:
        ValueError: bad ``fractions``.
        StudyError: a patient's studies carry different given splits, or an unknown split.
    """
    fr = _normalised_fractions(fractions)
    given = _given_splits(refs)
    assigned: dict[str, str] = dict(given)
    open_refs = [r for r in refs if r.patient_id not in given]
    if open_refs:
        strata = patient_strata(open_refs, has_tumour)
        members: dict[str, list[str]] = {s: [] for s in STRATA}
        for pid, s in strata.items():
            members[s].append(pid)
        for s in STRATA:
            members[s].sort(key=lambda pid: (_unit_hash(pid, seed), pid))
        lab = ("tumour", "tumour-free")
        per_stratum = dict(zip(lab, _stratum_quotas([len(members[s]) for s in lab],
                                                    split_quotas(sum(len(members[s]) for s in lab),
                                                                 fr))))
        per_stratum["unlabelled"] = list(split_quotas(len(members["unlabelled"]), fr))
        for s in STRATA:
            start = 0
            for split, count in zip(SPLITS, per_stratum[s]):
                for pid in members[s][start:start + count]:
                    assigned[pid] = split
                start += count
    return [dataclasses.replace(r, split=assigned[r.patient_id]) for r in refs]


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------

# Grids match when their affines agree to this many mm (rounding in headers written by other tools).
AFFINE_TOL_MM = 1e-3
CT_FILL_HU = -1000.0  # air: what the scanner would have seen outside the CT field of view

# What nibabel / gzip / zlib raise for a file that is not a NIfTI or is corrupt or truncated. A
# truncated .nii.gz usually passes the header read and fails only when the data is decompressed.
_READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError, struct.error,
                IndexError, TypeError)


@dataclass(eq=False)
class Study:
    """One loaded, validated study, all arrays on the SUV grid in (X, Y, Z) voxel order.

    ``suv`` float32 (SUV), ``ct`` float32 (HU), ``seg`` uint8 {0, 1} or None (unlabeled),
    ``affine`` (4, 4) float64 voxel -> mm, ``spacing_mm`` (3,) float64 voxel size in mm.
    """

    ref: StudyRef
    suv: np.ndarray
    ct: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    spacing_mm: np.ndarray

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (``prod(spacing_mm) / 1000``, since 1 ml = 1000 mm^3)."""
        return float(np.prod(self.spacing_mm)) / 1000.0


@dataclass
class _Image:
    data: np.ndarray
    affine: np.ndarray
    spacing_mm: np.ndarray


def _nifti_from_uri(uri: str, role: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI image read into memory from a URI (`s3://`, `file://`, ...), gzip or not."""
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise StudyError(uri, f"{role} file not found") from None
    except OSError as e:
        raise StudyError(uri, f"{role} cannot be read from storage ({type(e).__name__}: {e})") from e
    if raw[:2] == b"\x1f\x8b":  # gzip magic: .nii.gz
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise StudyError(uri, f"{role} data cannot be read, file corrupt or truncated "
                                  f"({type(e).__name__}: {e})") from e
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(raw)
        except Exception as e:  # noqa: BLE001 - header parsers raise many types; all mean "not this"
            errors.append(f"{type(e).__name__}: {e}")
    raise StudyError(uri, f"{role} is not a readable NIfTI file ({errors[0]})")


def _read_nifti(path: str, role: str, as_float: bool = True) -> _Image:
    """Read one NIfTI volume; every problem becomes a StudyError naming ``path``."""
    if is_uri(path):
        img = _nifti_from_uri(path, role)
    else:
        if not os.path.isfile(path):
            raise StudyError(path, f"{role} file not found")
        try:
            img = nib.load(path)
        except _READ_ERRORS as e:
            raise StudyError(path, f"{role} is not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise StudyError(path, f"{role} is not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    # Trailing singleton dims (X, Y, Z, 1) are a common export artefact and carry no information.
    shape3 = shape
    while len(shape3) > 3 and shape3[-1] == 1:
        shape3 = shape3[:-1]
    if len(shape3) != 3:
        raise StudyError(path, f"{role} must be a 3-D volume, got shape {shape}")
    if min(shape3) < 1:
        raise StudyError(path, f"{role} has an empty dimension, shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or \
            abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise StudyError(path, f"{role} has an invalid (non-finite or singular) affine")
    spacing = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise StudyError(path, f"{role} has invalid voxel spacing {tuple(spacing)} mm")
    try:
        if as_float:
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean a bad file
        raise StudyError(path, f"{role} data cannot be read, file corrupt or truncated "
                               f"({type(e).__name__}: {e})") from e
    finally:
        img.uncache()
    return _Image(np.asarray(data).reshape(shape3), affine, spacing)


def _count_nonfinite(a: np.ndarray) -> tuple[int, int]:
    """(number of NaN, number of +-inf) voxels."""
    if not np.issubdtype(a.dtype, np.floating):
        return 0, 0
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def _check_finite(a: np.ndarray, path: str, role: str) -> None:
    n_nan, n_inf = _count_nonfinite(a)
    if n_nan or n_inf:
        raise StudyError(path, f"{role} has {n_nan + n_inf} non-finite voxel(s) "
                               f"({n_nan} NaN, {n_inf} inf) out of {a.size}")


def _same_grid(shape_a: tuple, aff_a: np.ndarray, shape_b: tuple, aff_b: np.ndarray) -> bool:
    return tuple(shape_a) == tuple(shape_b) and \
        bool(np.allclose(aff_a, aff_b, rtol=0.0, atol=AFFINE_TOL_MM))


def _resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_shape: tuple,
                      dst_affine: np.ndarray, fill: float) -> tuple[np.ndarray, float]:
    """Linear resampling of ``data`` onto the target grid; returns (array, fraction of the target
    covered by the source field of view).

    A target voxel is inside the source FOV when it falls within half a voxel of the source's outer
    voxel centres, i.e. inside the source voxels' footprint.
    """
    # dst voxel -> mm -> src voxel; affine_transform builds coordinates on the fly, so a full
    # 400x400x326 grid never needs three float64 coordinate arrays in memory.
    t = np.linalg.inv(src_affine) @ dst_affine
    matrix, offset = t[:3, :3], t[:3, 3]
    # 'nearest' extrapolates into the half-voxel margin that is still covered by the edge voxels.
    out = ndimage.affine_transform(data.astype(np.float32, copy=False), matrix, offset=offset,
                                   output_shape=tuple(dst_shape), output=np.float32, order=1,
                                   mode="nearest", prefilter=False)
    inside = ndimage.affine_transform(np.ones(data.shape, dtype=np.uint8), matrix, offset=offset,
                                      output_shape=tuple(dst_shape), output=np.uint8, order=0,
                                      mode="grid-constant", cval=0, prefilter=False)
    covered = inside.astype(bool)
    out[~covered] = fill
    return out, float(covered.mean())


def load_study(ref: StudyRef) -> Study:
    """Read and validate one study's SUV, CT and (optional) SEG NIfTI files.

    Returns arrays on the SUV grid: SUV float32, CT float32 in HU, SEG uint8 {0, 1} (``SEG > 0``, so a
    {0, 255} float mask is fine). A CT on another grid is resampled onto the SUV grid (linear,
    -1000 HU outside the CT field of view) and logged. Slightly negative SUV (PET noise) is accepted.

    Raises:
        StudyError(file, problem): a file is missing, not a NIfTI, corrupt or truncated, not 3-D (trailing
            singleton dims are squeezed), SUV or CT holds NaN/inf, SEG is not on the SUV grid (shape and
            affine within 1e-3 mm), or the CT does not overlap the SUV field of view.
    """
    suv_img = _read_nifti(ref.suv_path, "SUV")
    suv = suv_img.data
    _check_finite(suv, ref.suv_path, "SUV")
    if suv.size and float(suv.min()) < -100.0:
        # Far below any PET noise floor: most likely a CT (HU) stored under the SUV name.
        logger.warning("%s: SUV minimum %.1f looks like HU; are SUV and CT swapped?",
                       ref.suv_path, float(suv.min()))

    ct_img = _read_nifti(ref.ct_path, "CT")
    _check_finite(ct_img.data, ref.ct_path, "CT")
    if _same_grid(ct_img.data.shape, ct_img.affine, suv.shape, suv_img.affine):
        ct = ct_img.data
    else:
        ct, covered = _resample_to_grid(ct_img.data, ct_img.affine, suv.shape, suv_img.affine,
                                        CT_FILL_HU)
        if covered <= 0.0:
            raise StudyError(ref.ct_path, f"CT (shape {ct_img.data.shape}) does not overlap the SUV "
                                          f"field of view (shape {suv.shape}); check the affines")
        logger.info("%s: CT grid (shape %s, spacing %s mm) differs from the SUV grid (shape %s, "
                    "spacing %s mm); resampled onto the SUV grid (linear, %.0f HU outside the CT "
                    "field of view, %.1f%% of SUV voxels covered)", ref.ct_path,
                    ct_img.data.shape, _fmt_mm(ct_img.spacing_mm), suv.shape,
                    _fmt_mm(suv_img.spacing_mm), CT_FILL_HU, 100.0 * covered)
    del ct_img

    seg = None
    if ref.seg_path is not None:
        seg_img = _read_nifti(ref.seg_path, "SEG", as_float=False)
        if not _same_grid(seg_img.data.shape, seg_img.affine, suv.shape, suv_img.affine):
            diff = float(np.max(np.abs(seg_img.affine - suv_img.affine)))
            raise StudyError(ref.seg_path, f"SEG is not on the SUV grid: shape {seg_img.data.shape} "
                                           f"vs SUV {suv.shape}, affines differ by up to {diff:.4g} mm "
                                           f"(tolerance {AFFINE_TOL_MM} mm)")
        _check_finite(seg_img.data, ref.seg_path, "SEG")
        seg = (seg_img.data > 0).astype(np.uint8)

    return Study(ref=ref, suv=suv, ct=ct, seg=seg, affine=suv_img.affine,
                 spacing_mm=suv_img.spacing_mm)


def _fmt_mm(spacing: np.ndarray) -> str:
    return "x".join(f"{s:.3g}" for s in spacing)


# --------------------------------------------------------------------------------------------------
# Weak labels derived from SEG
# --------------------------------------------------------------------------------------------------

def _check_3d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (X, Y, Z) array, got shape {a.shape}")
    return a


def slice_labels(seg: np.ndarray) -> np.ndarray:
    """Per axial slice (axis 2): True where the slice holds any tumour voxel. Returns bool (Z,)."""
    seg = _check_3d(seg, "seg")
    return np.asarray((seg > 0).any(axis=(0, 1)), dtype=bool)


@dataclass(eq=False)
class Lesion:
    """One connected lesion of a SEG mask, in voxel indices of the (X, Y, Z) grid.

    ``bbox_min`` / ``bbox_max`` (3,) int64, both inclusive; ``centre_vox`` (3,) float64 centre of mass.
    Multiply by the spacing (or apply the affine) for mm; ``n_voxels * voxel_volume_ml`` for ml.
    """

    label: int
    n_voxels: int
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    centre_vox: np.ndarray

    def to_dict(self) -> dict:
        return {"label": int(self.label), "n_voxels": int(self.n_voxels),
                "bbox_min": [int(v) for v in self.bbox_min],
                "bbox_max": [int(v) for v in self.bbox_max],
                "centre_vox": [float(v) for v in self.centre_vox]}


_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def find_lesions(seg: np.ndarray, connectivity: int = 26) -> list[Lesion]:
    """Connected components of ``seg > 0`` (``connectivity`` 6, 18 or 26 neighbours), sorted by label.

    Gives the weak labels of the box- and point-supervised methods: one bounding box and one centre
    point per lesion.
    """
    seg = _check_3d(seg, "seg")
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    mask = seg > 0
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    idx = np.arange(1, n + 1)
    centres = ndimage.center_of_mass(mask, labels, idx)
    lesions = []
    for lab, sl, c in zip(idx, ndimage.find_objects(labels), centres):
        lesions.append(Lesion(
            label=int(lab),
            n_voxels=int(counts[lab]),
            bbox_min=np.array([s.start for s in sl], dtype=np.int64),
            bbox_max=np.array([s.stop - 1 for s in sl], dtype=np.int64),
            centre_vox=np.asarray(c, dtype=np.float64),
        ))
    return lesions


# --------------------------------------------------------------------------------------------------
# Writing masks
# --------------------------------------------------------------------------------------------------

def _nifti_suffix(name: str) -> str:
    low = name.lower()
    for s in (".nii.gz", ".nii"):
        if low.endswith(s):
            return name[-len(s):]
    raise ValueError(f"mask path must end in .nii.gz or .nii, got {name!r}")


def write_mask(path: str | os.PathLike, mask: np.ndarray, affine: np.ndarray) -> None:
    """Write a binary mask (``mask > 0``) as a uint8 NIfTI with ``affine`` (4, 4, voxel -> mm) as both
    qform and sform (code 1).

    Atomic: written to a hidden temp name in the same folder, then ``os.replace``d, so a reader
    never sees a half-written file. Parent folders are created.
    """
    mask = _check_3d(mask, "mask")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite (4, 4) array, got shape {aff.shape}")
    dst = Path(os.fspath(path))
    suffix = _nifti_suffix(dst.name)
    stem = dst.name[: -len(suffix)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = (mask > 0).astype(np.uint8)
    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(np.uint8)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    # The suffix must stay last so nibabel picks the same compression; the random part keeps two
    # threads of one process from sharing a temp file.
    tmp = dst.parent / f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        nib.save(img, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------------------------------
# Cohort summary
# --------------------------------------------------------------------------------------------------

def cohort_summary(refs: Sequence[StudyRef], load: bool = True) -> dict:
    """Counts describing a cohort, for the demo's printout.

    Keys: ``n_studies``, ``n_patients``, ``splits`` ({split or "unassigned": n_studies}),
    ``n_labeled`` (studies with a SEG path). With ``load=True`` every study is loaded (one at a time)
    and also: ``n_loaded``, ``n_negative`` (labeled with an empty SEG), ``n_lesions`` (26-connected),
    ``n_slices`` (axial slices of all loaded studies), ``n_tumour_slices``, ``n_failed`` and
    ``failures`` (list of {patient_id, study_id, path, problem}); a failing study is listed, not raised.
    With ``load=False`` those keys are None / empty.
    """
    splits: dict[str, int] = {}
    for r in refs:
        key = r.split if r.split is not None else "unassigned"
        splits[key] = splits.get(key, 0) + 1
    ordered = {s: splits[s] for s in (*SPLITS, "unassigned") if s in splits}
    ordered.update({s: n for s, n in splits.items() if s not in ordered})
    summary: dict = {
        "n_studies": len(refs),
        "n_patients": len({r.patient_id for r in refs}),
        "splits": ordered,
        "n_labeled": sum(r.seg_path is not None for r in refs),
        "n_loaded": None,
        "n_negative": None,
        "n_lesions": None,
        "n_slices": None,
        "n_tumour_slices": None,
        "n_failed": 0,
        "failures": [],
    }
    if not load:
        return summary
    n_loaded = n_negative = n_lesions = n_slices = n_tumour = 0
    failures: list[dict] = []
    for r in refs:
        try:
            st = load_study(r)
        except StudyError as e:
            failures.append({"patient_id": r.patient_id, "study_id": r.study_id,
                             "path": e.path, "problem": e.problem})
            continue
        n_loaded += 1
        n_slices += int(st.suv.shape[2])
        if st.seg is not None:
            labels = slice_labels(st.seg)
            n_tumour += int(labels.sum())
            if not labels.any():
                n_negative += 1
            else:
                n_lesions += len(find_lesions(st.seg))
        del st
    summary.update(n_loaded=n_loaded, n_negative=n_negative, n_lesions=n_lesions, n_slices=n_slices,
                   n_tumour_slices=n_tumour, n_failed=len(failures), failures=failures)
    return summary


def format_cohort_summary(summary: dict) -> str:
    """A readable multi-line rendering of :func:`cohort_summary`'s dict."""
    def v(key: str) -> str:
        x = summary.get(key)
        return "-" if x is None else str(x)

    splits = summary.get("splits") or {}
    split_txt = ", ".join(f"{k} {n}" for k, n in splits.items()) or "-"
    lines = [
        f"studies   {v('n_studies')} ({v('n_patients')} patients); splits: {split_txt}",
        f"labeled   {v('n_labeled')} (negative, empty SEG: {v('n_negative')})",
    ]
    if summary.get("n_loaded") is not None:
        n_slices, n_tum = summary.get("n_slices") or 0, summary.get("n_tumour_slices") or 0
        frac = f" ({100.0 * n_tum / n_slices:.1f}%)" if n_slices else ""
        lines += [
            f"loaded    {v('n_loaded')}, failed {v('n_failed')}",
            f"lesions   {v('n_lesions')}",
            f"slices    {v('n_slices')} axial, {v('n_tumour_slices')} with tumour{frac}",
        ]
    for f in summary.get("failures") or []:
        lines.append(f"  FAILED {f['patient_id']}/{f['study_id']}: {f['path']}: {f['problem']}")
    return "\n".join(lines)
