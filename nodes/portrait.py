"""Expression, face and conditioning nodes: driving IMAGE -> expressions; reference IMAGE -> faces;
both -> FP_PORTRAIT for the sampler."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core import pipeline as P
from fantasyportrait_core.faces import Face
from fantasyportrait_core.masks import box_masks
from fantasyportrait_core.preview import add_caption, detector_label, draw_faces

from . import host

CATEGORY = "FantasyPortrait"
MAX_EXTRA_EXPRESSIONS = 3  # expression + expression_2..4
_EXPRESSION_CACHE: "OrderedDict[tuple, list]" = OrderedDict()  # content hash -> drivers, across prompts
_EXPRESSION_CACHE_SIZE = 8


def _frames_key(frames: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(frames).data, digest_size=16).hexdigest() + str(frames.shape)


@dataclass
class ReferenceFaces:
    """FP_FACES: faces found in the reference image (left to right), the image and its size."""

    faces: list[Face]
    width: int
    height: int
    image: np.ndarray = field(repr=False, default=None)


@dataclass
class PortraitInputs:
    """FP_PORTRAIT: characters (face + expression sequence each) to condition the sampler on.

    Faces are in reference-image pixels; the sampler maps them to the generated size.
    """

    faces: list[Face]
    drivers: list[P.DrivingExpression]
    ref_width: int
    ref_height: int
    scale: float = 1.0
    user_masks: list[torch.Tensor | None] = field(default_factory=list)


class FantasyPortraitEncodeExpression:
    """Driving frames -> per-frame expression features of one or several people."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "expression_encoder": ("FP_EXPRESSION_ENCODER", {"tooltip": "From Expression Encoder Loader."}),
            "face_detector": ("FP_FACE_DETECTOR", {"tooltip": "From Face Detector."}),
            "images": ("IMAGE", {"tooltip": "Driving video frames (e.g. from Load Video → Get Video Components)."}),
            "people": ("INT", {"default": 1, "min": 1, "max": 8,
                               "tooltip": "How many faces to take from this video, ordered left to right."}),
            "smooth": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.1,
                                 "tooltip": "Temporal smoothing of the face landmarks (Gaussian sigma in frames) "
                                            "before alignment; 1 removes crop jitter. 0 = off (reference)."}),
        }}

    RETURN_TYPES = ("FP_EXPRESSION", "IMAGE", "STRING")
    RETURN_NAMES = ("expression", "aligned_faces", "info")
    OUTPUT_TOOLTIPS = ("Expression sequences, one per person.",
                       "The aligned 224×224 face crops the encoder saw (first person).",
                       "Frames without a face (filled from neighbours), per person.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Detects and tracks faces in the driving frames, aligns each face on 5 landmarks and encodes "
                   "its headpose, eyes, emotion and mouth. Frames without a face are filled from neighbours.")

    def encode(self, expression_encoder, face_detector, images, people=1, smooth=0.0):
        frames = host.image_to_uint8(images)
        # The same driving clip queued again (other seed, prompt or reference) is not re-encoded,
        # even when ComfyUI's own cache was invalidated by other prompts in between.
        key = (_frames_key(frames), people, float(smooth), id(face_detector), id(expression_encoder))
        drivers = _EXPRESSION_CACHE.get(key)
        if drivers is None:
            device = host.torch_device()
            with P.on_device(expression_encoder, device):
                drivers = P.encode_driving(face_detector, expression_encoder, frames, people=people, smooth=smooth)
            _EXPRESSION_CACHE[key] = drivers
            while len(_EXPRESSION_CACHE) > _EXPRESSION_CACHE_SIZE:
                _EXPRESSION_CACHE.popitem(last=False)
        else:
            _EXPRESSION_CACHE.move_to_end(key)
        info = [f"detector: {detector_label(face_detector)}"]
        for i, d in enumerate(drivers):
            miss = d.track.missing
            info.append(f"person {i}: {d.num_frames} frames, {len(miss)} without a face"
                        + (f" (filled: {miss[:50]}{' ...' if len(miss) > 50 else ''})" if miss else ""))
        return (drivers, host.uint8_to_image(drivers[0].crops), "\n".join(info))


class FantasyPortraitFaceMasks:
    """Reference image -> faces (left to right), one MASK per face and a numbered preview."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_detector": ("FP_FACE_DETECTOR", {"tooltip": "From Face Detector."}),
            "image": ("IMAGE", {"tooltip": "The reference portrait (first frame used)."}),
        }}

    RETURN_TYPES = ("FP_FACES", "MASK", "IMAGE")
    RETURN_NAMES = ("faces", "face_masks", "preview")
    OUTPUT_TOOLTIPS = ("Faces for Portrait Conditioning.", "One mask per face (box), left to right.",
                       "The reference with numbered faces: #0 is the leftmost.")
    FUNCTION = "detect"
    CATEGORY = CATEGORY

    def detect(self, face_detector, image):
        ref = host.image_to_uint8(image)[0]
        faces = face_detector.detect(ref)
        if not faces:
            raise ValueError("no face found in the reference image; use a clearer, larger or more frontal face")
        h, w = ref.shape[:2]
        boxes = np.stack([np.round(f.box).astype(int) for f in faces])
        masks = box_masks(boxes, h, w).float()
        preview = add_caption(draw_faces(ref, faces), f"detector: {detector_label(face_detector)}")
        return (ReferenceFaces(faces, w, h, ref), masks, host.uint8_to_image(preview))


class FantasyPortraitConditioning:
    """Faces + expression sequences (+ optional masks) -> FP_PORTRAIT for the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"expression_{i}": ("FP_EXPRESSION", {"tooltip": "More characters (their own driving video)."})
                    for i in range(2, 2 + MAX_EXTRA_EXPRESSIONS)}
        optional["masks"] = ("MASK", {
            "tooltip": "Optional: one mask per character (batch in character order), e.g. drawn in the mask "
                       "editor, replacing the automatic face region. An empty mask keeps the automatic one."})
        return {"required": {
            "faces": ("FP_FACES", {"tooltip": "Reference faces from Face Masks."}),
            "expression": ("FP_EXPRESSION", {"tooltip": "First character(s): from Encode Expression."}),
            "portrait_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                         "tooltip": "Strength of the expression branch inside the transformer."}),
            "assignment": (list(P.ASSIGN_MODES), {"default": "left_to_right", "tooltip":
                           "Which face each character animates: left_to_right (one character: the largest face), "
                           "right_to_left, largest_first, or identity (closest-looking face; needs the insightface "
                           "detector)."}),
            "face_order": ("STRING", {"default": "", "tooltip":
                                      "Overrides assignment: the face number (from the Face Masks preview) of each "
                                      "character, e.g. '1,0'. Empty = use assignment."}),
        }, "optional": optional}

    RETURN_TYPES = ("FP_PORTRAIT", "IMAGE")
    RETURN_NAMES = ("portrait", "preview")
    FUNCTION = "condition"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Pairs each expression sequence with a face of the reference image. Characters are the people "
                   "of 'expression', then of expression_2, 3, 4, in order.")

    def condition(self, faces, expression, portrait_scale=1.0, assignment="left_to_right", face_order="", masks=None,
                  **more):
        drivers = list(expression)
        for i in range(2, 2 + MAX_EXTRA_EXPRESSIONS):
            drivers += list(more.get(f"expression_{i}") or [])
        order = P.parse_face_order(face_order)
        chosen = P.assign_faces(faces.faces, len(drivers), order, assignment,
                                [P.driver_embedding(d) for d in drivers])
        user_masks: list = [None] * len(drivers)
        if masks is not None:
            m = masks if masks.ndim == 3 else masks[None]
            if m.shape[0] != len(drivers):
                raise ValueError(f"masks has {m.shape[0]} mask(s) for {len(drivers)} character(s); give one per character")
            user_masks = [mi if mi.max() > 0.5 else None for mi in m]
        canvas = faces.image if faces.image is not None else np.full((faces.height, faces.width, 3), 40, np.uint8)
        index = {id(f): k for k, f in enumerate(faces.faces)}
        preview = draw_faces(canvas, chosen, labels=[f"face #{index[id(f)]} <- character {i}"
                                                     for i, f in enumerate(chosen)])
        return (PortraitInputs(chosen, drivers, faces.width, faces.height, portrait_scale, user_masks),
                host.uint8_to_image(preview))
