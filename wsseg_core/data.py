"""Studies: references, loading and validation of the volumes, weak labels (slices, lesions), mask
writing.

Cohort discovery, manifests, splits and the cohort summary live in :mod:`wsseg_core.cohort`; their
names stay importable from here (see the end of this module).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from scipy import ndimage

from wsseg_core.storage import atomic_path, is_uri, read_bytes

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
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = (mask > 0).astype(np.uint8)
    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(np.uint8)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    # The suffix must stay last so nibabel picks the same compression (storage.temp_name's random
    # part keeps two threads of one process from sharing a temp file).
    with atomic_path(dst, suffix) as tmp:
        nib.save(img, tmp)


# --------------------------------------------------------------------------------------------------
# Names that moved to wsseg_core.cohort (issue 19), still importable from here
# --------------------------------------------------------------------------------------------------

# Resolved on first access (PEP 562) rather than imported at the top: cohort imports this module,
# so an eager import here would be circular whenever cohort is imported first.
_COHORT_NAMES = frozenset({
    "SPLITS", "MANIFEST_COLUMNS", "STRATA", "discover_cohort", "read_manifest", "load_cohort",
    "split_quotas", "patient_strata", "assign_splits", "cohort_summary", "format_cohort_summary",
})


def __getattr__(name: str):
    if name in _COHORT_NAMES:
        from wsseg_core import cohort

        return getattr(cohort, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _COHORT_NAMES)
