"""FantasyPortrait core, shared by the CLI and the ComfyUI nodes (never imports ComfyUI).

Data flow (one function per arrow): reference image + driving video(s)
→ :func:`~fantasyportrait_core.drive.encode.encode_driving` (faces, aligned crops, expression
features per person)
→ :func:`~fantasyportrait_core.faces.layout.reference_layout` (reference faces, per-person regions,
latent person map; faces picked by :func:`~fantasyportrait_core.faces.assign.assign_faces`)
→ :func:`~fantasyportrait_core.drive.condition.portrait_condition` (expression tokens in
per-latent-frame windows + masks)
→ :func:`~fantasyportrait_core.sampling.generate.generate_latent` (flow sampling with dual guidance)
→ VAE decode (:func:`~fantasyportrait_core.sampling.generate.decode_latent`) → frames.
:func:`~fantasyportrait_core.runtime.runner.run_job` runs it end to end.
"""
