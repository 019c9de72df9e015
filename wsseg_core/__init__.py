"""wsseg_core: weakly supervised tumour segmentation for whole-body PET/CT.

A library of small, pure functions and small classes over numpy / torch / nibabel.
It never imports ray: the Ray entry points live in ``jobs/``.

Modules, one concept each (docs/ARCHITECTURE.md lists their API):
    methods     the eight methods: one registry of segment(study, context) callables; network loaders
    storage     local paths and URIs; the atomic writers (temp name, then os.replace)
    run_folder  a run folder as one object: layout, URI staging, fetch/publish, atomic writes
    data        study references, loading and validation of the volumes, weak labels, mask writing
    cohort      cohort discovery (folder layout), manifests, subject-level splits, cohort summary
    phantom     synthetic whole-body PET/CT cohort in the autoPET layout
    checkpoint  the one checkpoint file format of every network
    models      VGG16 slice classifier (Früh et al.) and its input preprocessing
    geometry    slice <-> network input map: resize, or resample to mm pixels on a body-centred canvas
    train       slice sampling, augmentation, training / evaluation loops (plain PyTorch)
    gate        flag threshold and quality gate of the slice classifier
    cams        CAM, GradCAM, GradCAM++, ScoreCAM for a batch of slices
    inference   classifier and CAMs over a whole volume, batch by batch
    segment     Algorithm 1 (CAM region + SUV percentile) and the global-threshold baseline
    thresholds  the thresholds.json format: the paper's values, reading and merging tuned ones
    gridcache   the tuning cache: the voxel counts behind every (t, q) Dice of a study
    selection   the searches' rule: Dice per patient, then over patients; the best cell
    unet        supervised 2-D U-Net baseline (upper bound)
    mipcam      MIP-CAM (Amyar et al.): the method, its grids, checkpoint and segmenter; re-exports
                mipcam_geometry (axes, MIPs, projections), mipcam_net (samples, CNN, CAMs,
                training) and mipcam_reconstruct (back-projection, 3-D region, Dice grid)
    losses      Afshari et al.'s box losses (Eq. 1-7)
    boxfcn      BoxFCN (Afshari et al.): box labels, 3-D FCN, training, inference
    packing     compact masks and SUV crops between processes
    metrics     Dice, MTV (ml), TLG (g), autoPET and lesion-wise metrics, ROC AUC
    stats       ICC(2,1), per-method summaries, paired comparisons
    report      figures (PNG) and the HTML report
"""

__version__ = "0.1.0"
