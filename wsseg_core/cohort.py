"""Cohort: discovery (autoPET folder layout), manifests (CSV / Parquet), subject-level splits and
the cohort summary.

The studies themselves (:class:`~wsseg_core.data.StudyRef`, loading, weak labels) are in
:mod:`wsseg_core.data`, which still re-exports this module's public names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from wsseg_core import storage
from wsseg_core.data import (StudyError, StudyRef, find_lesions, load_study, seg_has_tumour,
                             slice_labels)

logger = logging.getLogger(__name__)

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
