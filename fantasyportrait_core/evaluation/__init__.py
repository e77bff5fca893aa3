"""How faithfully a generated video follows its driving video: expression-fidelity metrics.

Both videos go through the same face pipeline as generation (:func:`~.faces.detect_video`,
:func:`~.faces.track_faces`, the 5-point alignment of :mod:`.expression`), frame ``i`` of the
generated video is compared with frame ``i`` of the driving video (after resampling both to one
frame rate), and each character's generated face is matched to its driver by the assignment the
generation used (:func:`~.faces.assign.assign_faces`). Per character:

========================  =====================================================================
metric                    definition (source)
========================  =====================================================================
``expression``            AED-style: mean over frames of the L2 distance between the PD-FGC
                          emotion (30) + mouth (512) features of the generated and the driving
                          face. AED/APD are the talking-head reenactment metrics of PIRenderer
                          (Ren et al., ICCV 2021) and its successors, there on 3DMM expression /
                          pose coefficients; FantasyPortrait (arXiv 2507.12956, §4, ExprBench)
                          reports AED, APD and an eye-motion MAE. Here the 3DMM is replaced by
                          the PD-FGC encoder the model is conditioned on (:func:`~.metrics.feature_metrics`).
``head_pose``             APD-style: the same on the PD-FGC headpose features (6).
``eye_openness``          per-frame eye opening (:func:`~.measure.crop_curves` / :func:`~.measure.mesh_curves`),
                          Pearson correlation and MAE between the two curves (the paper's eye
                          MAE idea, §4) (:func:`~.metrics.curve_metrics`).
``mouth_opening``         the same for the mouth opening.
``mouth_width``           the same for the mouth-corner distance (from the 5 landmarks).
``identity``              mean cosine similarity of ArcFace embeddings of the generated face to
                          the reference face (insightface backend only; else "not measured").
                          PD-FGC features are identity-agnostic by design and never used here.
``overall``               see :func:`~.metrics.overall_score`.
========================  =====================================================================

Every distance also has a ``relative`` form (divided by the driving clip's own spread, so 1 means
"as far off as a frozen average face") and a ``score`` ``1 / (1 + relative)`` in (0, 1].

PD-FGC numbers are only meaningful with the released ``pd_fpg.pth``; with a randomly initialised
encoder (tests, ``--tiny-random``) they are structurally right (0 for identical faces, growing
with difference) but their size says nothing, and the report says so.

Modules: :mod:`.measure` (what is measured of a face through a clip), :mod:`.metrics` (distances and
scores), :mod:`.match` (generated faces paired with their drivers), :mod:`.compare` (whole videos:
:func:`~.compare.evaluate`), :mod:`.report` (table, JSON, plot).
"""
