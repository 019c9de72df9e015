"""Synthetic phantom: determinism, geometry conventions, a real weak-supervision problem, autoPET layout."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from wsseg_core import phantom as P
from wsseg_core.phantom import make_phantom_study, write_phantom_cohort
from wsseg_core.report import phantom_figure

SMALL = (64, 64, 48)  # cohort-writer tests: layout, not anatomy


@lru_cache(maxsize=None)
def study(seed: int, negative: bool = False) -> P.PhantomStudy:
    return make_phantom_study(seed, negative=negative)


POSITIVE_SEEDS = (0, 1, 2, 3, 4, 5)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = make_phantom_study(11), make_phantom_study(11)
    for name in ("suv", "ct", "seg"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesions == b.lesions
    c = make_phantom_study(12)
    assert not np.array_equal(a.suv, c.suv)
    assert not np.array_equal(a.seg, c.seg)


def test_shapes_dtypes_affine_las():
    st = study(0)
    assert st.suv.shape == st.ct.shape == st.seg.shape == P.DEFAULT_SHAPE
    assert st.suv.dtype == np.float32 and st.ct.dtype == np.float32 and st.seg.dtype == np.uint8
    assert set(np.unique(st.seg)) <= {0, 1}
    assert nib.aff2axcodes(st.affine) == ("L", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(st.affine)[:3]), P.DEFAULT_SPACING_MM)
    assert st.suv.min() >= 0.0
    other = make_phantom_study(0, shape=(48, 40, 32), spacing_mm=(3.0, 3.0, 4.0))
    assert other.suv.shape == (48, 40, 32)
    np.testing.assert_allclose(np.abs(np.diag(other.affine)[:3]), (3.0, 3.0, 4.0))


def test_seg_positive_and_negative():
    for s in POSITIVE_SEEDS:
        st = study(s)
        assert st.seg.any() and 1 <= len(st.lesions) <= 8
    neg = study(0, negative=True)
    assert not neg.seg.any() and neg.lesions == [] and neg.diagnosis == "NEGATIVE"
    # physiological uptake is still there in a negative control
    assert neg.suv.max() > 5.0


def test_seg_only_lesions_never_organs():
    for s in POSITIVE_SEEDS:
        st = study(s)
        seg = st.seg.astype(bool)
        assert not np.isin(st.organs[seg], P.PHYSIOLOGICAL + (P.AIR,)).any()
        assert seg.sum() <= sum(les.n_voxels for les in st.lesions)
        # every SEG voxel lies within some lesion's bounding slice range
        zs = np.flatnonzero(seg.any(axis=(0, 1)))
        covered = np.zeros(seg.shape[2], bool)
        for les in st.lesions:
            covered[les.z_range[0]:les.z_range[1] + 1] = True
        assert covered[zs].all()


def test_physiological_uptake_confuses_a_plain_threshold():
    dices = []
    for s in POSITIVE_SEEDS:
        st = study(s)
        seg = st.seg.astype(bool)
        pred = st.suv >= np.median(st.suv[seg])
        fp = pred & ~seg
        dices.append(2 * (pred & seg).sum() / (pred.sum() + seg.sum()))
        # the false positives are organs, not noise
        assert np.isin(st.organs[fp], (P.BRAIN, P.BLADDER, P.KIDNEY, P.MYOCARDIUM)).sum() > 500
    assert max(dices) < 0.6 and np.mean(dices) < 0.4


def test_organ_uptake_ordering():
    st = study(1)
    mean = {n: float(st.suv[st.organs == i].mean()) for i, n in enumerate(P.ORGAN_NAMES) if (st.organs == i).any()}
    assert mean["lung"] < mean["soft_tissue"] < mean["liver"] < mean["brain"]
    assert mean["bladder"] > 5.0 and mean["kidney"] > 2.5
    assert mean["fat"] < mean["soft_tissue"]


def test_several_lesions_on_one_axial_slice():
    best = 0
    for s in POSITIVE_SEEDS:
        seg = study(s).seg
        best = max(best, max(ndimage.label(seg[:, :, z])[1] for z in np.flatnonzero(seg.any(axis=(0, 1)))))
    assert best >= 2


def test_lesion_sizes_and_uptake_vary():
    les = [l for s in POSITIVE_SEEDS for l in study(s).lesions]
    d = [l.diameter_mm for l in les]
    suv = [l.suv for l in les]
    assert min(d) < 12 and max(d) > 25
    assert min(suv) < 4 and max(suv) > 10
    assert len({l.site for l in les}) >= 4


def test_ct_hounsfield_ranges():
    st = study(2)
    ct, org = st.ct, st.organs
    assert ct[org == P.AIR].mean() < -900
    assert ct[org == P.LUNG].mean() < -500
    assert ct[org == P.BONE].mean() > 300
    assert -150 < ct[org == P.FAT].mean() < -50
    assert 0 < ct[org == P.SOFT].mean() < 100
    assert (org == P.LUNG).sum() > 1000 and (org == P.BONE).sum() > 1000


def test_cohort_plan_has_follow_ups_and_negatives():
    plan = P._cohort_plan(24, 0, 0.25)
    patients = [p[0] for p in plan]
    assert max(patients.count(p) for p in set(patients)) == 2
    assert sum(p[2] for p in plan) == 6
    # a follow-up shares the patient's anatomy and diagnosis
    for a, b in zip(plan, plan[1:]):
        if a[0] == b[0]:
            assert a[3] == b[3] and a[4] == b[4]


def test_cohort_writer_autopet_layout(tmp_path: Path):
    refs = write_phantom_cohort(tmp_path / "cohort", n=4, shape=SMALL, seed=3, negative_fraction=0.25)
    assert len(refs) == 4
    assert sum(r.diagnosis == "NEGATIVE" for r in refs) == 1
    for r in refs:
        suv_p = Path(r.suv_path)
        assert suv_p.is_absolute() and " " in r.study_id
        assert suv_p.parent.name == r.study_id and suv_p.parent.parent.name == r.patient_id
        assert r.patient_id.startswith("PETCT_")
        assert [Path(p).name for p in (r.suv_path, r.ct_path, r.seg_path)] == ["SUV.nii.gz", "CTres.nii.gz", "SEG.nii.gz"]
        suv, ct, seg = (nib.load(p) for p in (r.suv_path, r.ct_path, r.seg_path))
        for img in (suv, ct, seg):
            assert img.shape == SMALL
            assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms()[:3], P.DEFAULT_SPACING_MM, rtol=1e-6)
        assert suv.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
        seg_a = np.asarray(seg.dataobj)
        assert seg_a.any() == (r.diagnosis != "NEGATIVE")
        assert float(np.asarray(ct.dataobj).min()) <= -990
    assert not [p for p in (tmp_path / "cohort").rglob(".tmp-*")]
    # rewriting the same folder is deterministic
    first = np.asarray(nib.load(refs[0].suv_path).dataobj).copy()
    refs2 = write_phantom_cohort(tmp_path / "cohort", n=4, shape=SMALL, seed=3, negative_fraction=0.25)
    assert refs2 == refs
    np.testing.assert_array_equal(np.asarray(nib.load(refs[0].suv_path).dataobj), first)


def test_cli_and_figure(tmp_path: Path, capsys):
    png = tmp_path / "fig" / "ph.png"
    assert P.main([str(tmp_path / "c"), "--n", "2", "--shape", *map(str, SMALL), "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("PETCT_") >= 2 and "figure ->" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # a negative study (empty SEG) still draws
    neg = study(0, negative=True)
    p2 = phantom_figure(neg.suv, neg.ct, neg.seg, neg.spacing_mm, tmp_path / "neg.png", title="negative")
    assert p2.read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_phantom_study(0, shape=(4, 4, 4))
    with pytest.raises(ValueError):
        make_phantom_study(0, diagnosis="FLU")


def test_options_change_what_they_say_and_nothing_by_default(tmp_path: Path):
    from wsseg_core.phantom import ORGAN_NAMES, PhantomOptions, main

    shape = (64, 64, 48)
    base = make_phantom_study(7, shape=shape)
    same = make_phantom_study(7, shape=shape, options=PhantomOptions())
    np.testing.assert_array_equal(base.suv, same.suv)
    # organs twice as hot: the brain's mean SUV doubles (blur and noise aside), lesions keep theirs
    hot = make_phantom_study(7, shape=shape, options=PhantomOptions(organ_uptake_scale=2.0))
    brain = base.organs == ORGAN_NAMES.index("brain")
    ratio = hot.suv[brain].mean() / base.suv[brain].mean()
    assert 1.8 < ratio < 2.2, ratio
    assert [les.suv for les in hot.lesions] == [les.suv for les in base.lesions]
    # lesion size and contrast ranges are honoured
    opts = PhantomOptions(lesion_diameter_mm=(10.0, 14.0), lesion_suv=(8.0, 9.0), low_contrast_fraction=0.0)
    les = [l_ for s in range(8) for l_ in make_phantom_study(100 + s, shape=shape, options=opts).lesions]
    assert les and all(8.0 <= l_.suv <= 9.0 for l_ in les)
    assert all(9.99 <= l_.diameter_mm <= 14.01 for l_ in les)
    # z field of view: head-to-pelvis shows no legs; the brain takes a larger share of slices
    torso = make_phantom_study(7, shape=shape, options=PhantomOptions(body_z=(0.45, 1.0)))
    def brain_slices(st):
        return int((st.organs == ORGAN_NAMES.index("brain")).any(axis=(0, 1)).sum())
    assert brain_slices(torso) > 1.5 * brain_slices(base)
    # the CLI exposes the options and the study count
    assert main([str(tmp_path / "c"), "--n", "2", "--shape", "48", "48", "24", "--organ-uptake-scale", "1.5",
                 "--lesion-diameter", "8", "20", "--lesion-suv", "5", "10", "--body-z", "0.3", "1.0"]) == 0
    assert len(list((tmp_path / "c").glob("PETCT_*/*/SUV.nii.gz"))) == 2
    with pytest.raises(ValueError):
        PhantomOptions(body_z=(0.5, 0.5))
