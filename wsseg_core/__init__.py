"""wsseg_core: weakly supervised tumour segmentation for whole-body PET/CT.

A library of small, pure functions and small classes over numpy / torch / nibabel.
It never imports ray: the Ray entry points live in ``jobs/``.

Modules, one concept each:
    data     cohort discovery, manifests, study loading and validation, weak labels, splits
    phantom  synthetic whole-body PET/CT cohort in the autoPET layout
    models   VGG16 slice classifier (Früh et al.) and its input preprocessing
    geometry slice <-> network input map: resize, or resample to mm pixels on a body-centred canvas
    train    slice sampling, augmentation, training / evaluation loops (plain PyTorch)
    cams     CAM, GradCAM, GradCAM++, ScoreCAM for a batch of slices
    segment  Algorithm 1 (CAM region + SUV percentile) and the global-threshold baseline
    metrics  Dice, MTV (ml), TLG (g)
    stats    ICC(2,1) and per-method summaries
    report   figures (PNG)
"""

__version__ = "0.1.0"
