"""Evaluation node: driving IMAGE(s) + generated IMAGE -> expression-fidelity score table and plot."""

from __future__ import annotations

import json

from fantasyportrait_core.evaluation import compare
from fantasyportrait_core.evaluation.match import resample_frames
from fantasyportrait_core.evaluation.measure import LANDMARK_SOURCES
from fantasyportrait_core.evaluation.report import format_table, json_ready, plot
from fantasyportrait_core.faces.assign import ASSIGN_MODES
from fantasyportrait_core.runtime.residency import on_device
from fantasyportrait_core.validate import parse_face_order
from . import host

CATEGORY = "FantasyPortrait"
MAX_EXTRA_DRIVING = 3  # driving + driving_2..4, as expression_2..4 on the Conditioning node


class FantasyPortraitEvaluate:
    """How faithfully a generated video follows its driving video(s), per character."""

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"driving_{i}": ("IMAGE", {"tooltip": f"Driving frames of character {i} (when each character "
                                                          f"had its own driving video, as expression_{i})."})
                    for i in range(2, 2 + MAX_EXTRA_DRIVING)}
        optional.update({
            "expression_encoder": ("FP_EXPRESSION_ENCODER", {
                "tooltip": "From Expression Encoder Loader: adds the PD-FGC expression and head-pose distances. "
                           "Without it those two are reported as not measured."}),
            "reference": ("IMAGE", {"tooltip": "The reference portrait: identity target (insightface detector "
                                               "only). Default: the first generated frame."}),
            "driving_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.001,
                                      "tooltip": "Frame rate of the driving frames (e.g. from Get Video "
                                                 "Components). 0 = same as the generated video."}),
            "generated_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.001,
                                        "tooltip": "Frame rate of the generated frames. 0 = same as the driving "
                                                   "video. Driving frames are resampled to it."}),
        })
        return {"required": {
            "face_detector": ("FP_FACE_DETECTOR", {"tooltip": "From Face Detector (insightface adds identity)."}),
            "driving": ("IMAGE", {"tooltip": "The driving frames the generation used (first character, or all "
                                             "characters when people > 1)."}),
            "generated": ("IMAGE", {"tooltip": "The generated frames (after VAE Decode). Frame i is compared with "
                                               "driving frame i."}),
            "people": ("INT", {"default": 1, "min": 1, "max": 8,
                               "tooltip": "Characters taken from the 'driving' video (left to right), as on "
                                          "Encode Expression."}),
            "assignment": (list(ASSIGN_MODES), {"default": "left_to_right",
                                                "tooltip": "The assignment the Conditioning node used."}),
            "face_order": ("STRING", {"default": "", "tooltip": "The face_order the Conditioning node used."}),
            "landmarks": (list(LANDMARK_SOURCES), {
                "default": "auto", "tooltip": "Eye/mouth curves: auto = MediaPipe Face Mesh when installed with its "
                                              "models, else measured in the aligned face crop."}),
        }, "optional": optional}

    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("scores", "plot", "json")
    OUTPUT_TOOLTIPS = ("Score table: per character expression and head-pose distances, eye/mouth curve "
                       "correlation and MAE, identity, overall (1 = identical motion).",
                       "Per-frame curves, driving vs generated, one panel per metric and character.",
                       "Every metric as JSON (save it to compare seeds).")
    FUNCTION = "evaluate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Measures how faithfully the generated video follows its driving video(s): expression and "
                   "head-pose distance in the PD-FGC space the model is conditioned on, eye-openness and "
                   "mouth-opening curves (correlation, MAE), identity (insightface), and an overall score in "
                   "[0, 1]. Use it to pick the best of several seeds.")

    def evaluate(self, face_detector, driving, generated, people=1, assignment="left_to_right", face_order="",
                 landmarks="auto", expression_encoder=None, reference=None, driving_fps=0.0, generated_fps=0.0,
                 **more):
        clips = [host.image_to_uint8(driving)]
        clips += [host.image_to_uint8(more[f"driving_{i}"]) for i in range(2, 2 + MAX_EXTRA_DRIVING)
                  if more.get(f"driving_{i}") is not None]
        if len(clips) > 1 and people > 1:
            raise ValueError(f"people={people} takes several characters from 'driving'; with driving_2..4 "
                             f"connected set people to 1 (one character per video)")
        gen = host.image_to_uint8(generated)
        if driving_fps and generated_fps and abs(driving_fps - generated_fps) > 1e-3:
            clips = [resample_frames(c, driving_fps, generated_fps) for c in clips]
        ref = host.image_to_uint8(reference)[0] if reference is not None else None
        order = parse_face_order(face_order)
        count = people if len(clips) == 1 else len(clips)
        if expression_encoder is not None:
            with on_device(expression_encoder, host.torch_device()):
                ev = compare.evaluate(face_detector, clips, gen, count, expression_encoder, ref, assignment, order,
                                      landmarks)
        else:
            ev = compare.evaluate(face_detector, clips, gen, count, None, ref, assignment, order, landmarks)
        return (format_table(ev.report), host.uint8_to_image(plot(ev)),
                json.dumps(json_ready(ev.report), indent=1))
