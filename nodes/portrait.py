"""Expression, face and conditioning nodes: driving IMAGE -> expressions; reference IMAGE -> faces;
both -> FP_PORTRAIT for the sampler."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core import pipeline as P
from fantasyportrait_core.faces import Face
from fantasyportrait_core.masks import box_masks
from fantasyportrait_core.preview import draw_faces
from fantasyportrait_core.validate import InputError, parse_face_order

from . import host

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait"
MAX_EXTRA_EXPRESSIONS = 3  # expression + expression_2..4
_EXPRESSION_CACHE: "OrderedDict[tuple, list]" = OrderedDict()  # content hash -> drivers, across prompts
_EXPRESSION_CACHE_SIZE = 8


def _frames_key(frames: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(frames).data, digest_size=16).hexdigest() + str(frames.shape)


@dataclass
class ReferenceFaces:
    """FP_FACES: faces found in the reference image (reading order: the numbers on the preview),
    the image and its size."""

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
        }, "optional": {
            "max_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                   "Frames to detect and encode, from start_frame: set it to WanImageToVideo's length "
                                   "so a long clip is not encoded in full. 0 = every frame."}),
            "start_frame": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                    "First driving frame to use (0 = the first)."}),
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

    def encode(self, expression_encoder, face_detector, images, people=1, smooth=0.0, max_frames=0, start_frame=0):
        n = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim == 4 else None
        if n is not None and n > 0 and start_frame >= n:
            raise InputError(f"start_frame {start_frame} is past the end of the {n} driving frames; lower it")
        if n is not None and (start_frame or max_frames):
            images = images[start_frame:start_frame + max_frames if max_frames else None]  # only these are encoded
        frames = host.image_to_uint8(images, "images (driving frames)")
        # The same driving clip queued again (other seed, prompt or reference) is not re-encoded,
        # even when ComfyUI's own cache was invalidated by other prompts in between.
        key = (_frames_key(frames), people, float(smooth), id(face_detector), id(expression_encoder))
        drivers = _EXPRESSION_CACHE.get(key)
        if drivers is None:
            device = host.torch_device()
            with P.on_device(expression_encoder, device):
                drivers = P.encode_driving(face_detector, expression_encoder, frames, people=people, smooth=smooth,
                                           progress=host.progress, name="driving images")
            _EXPRESSION_CACHE[key] = drivers
            while len(_EXPRESSION_CACHE) > _EXPRESSION_CACHE_SIZE:
                _EXPRESSION_CACHE.popitem(last=False)
        else:
            _EXPRESSION_CACHE.move_to_end(key)
        info = []
        if drivers[0].people_seen > len(drivers):
            info.append(f"the video shows {drivers[0].people_seen} people; {len(drivers)} used (raise people to use more)")
        for i, d in enumerate(drivers):
            miss = d.track.missing
            info.append(f"person {i}: {d.num_frames} frames, {len(miss)} without a face"
                        + (f" (filled: {miss[:50]}{' ...' if len(miss) > 50 else ''})" if miss else ""))
        return (drivers, host.uint8_to_image(drivers[0].crops), "\n".join(info))


class FantasyPortraitFaceMasks:
    """Reference image -> faces (reading order), one MASK per face and a numbered preview."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_detector": ("FP_FACE_DETECTOR", {"tooltip": "From Face Detector."}),
            "image": ("IMAGE", {"tooltip": "The reference portrait (first frame used)."}),
        }}

    RETURN_TYPES = ("FP_FACES", "MASK", "IMAGE")
    RETURN_NAMES = ("faces", "face_masks", "preview")
    OUTPUT_TOOLTIPS = ("Faces for Portrait Conditioning.", "One mask per face (box), in face-number order.",
                       "The reference with numbered faces in reading order (rows top to bottom, left to right): "
                       "the numbers face_order takes.")
    FUNCTION = "detect"
    CATEGORY = CATEGORY

    def detect(self, face_detector, image):
        ref = host.image_to_uint8(image[:1] if isinstance(image, torch.Tensor) and image.ndim == 4 else image,
                                  "image (reference)")[0]
        faces = P.detect_reference(face_detector, ref)
        if not faces:
            raise InputError("no face found in the reference image; use a clearer, larger or more frontal face")
        h, w = ref.shape[:2]
        boxes = np.stack([np.round(f.box).astype(int) for f in faces])
        masks = box_masks(boxes, h, w).float()
        return (ReferenceFaces(faces, w, h, ref), masks, host.uint8_to_image(draw_faces(ref, faces)))


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
                                      "Overrides assignment: the face number (from the Face Masks preview, reading "
                                      "order from 0) of each character, e.g. '1,0'. Empty = use assignment."}),
        }, "optional": optional}

    RETURN_TYPES = ("FP_PORTRAIT", "IMAGE")
    RETURN_NAMES = ("portrait", "preview")
    FUNCTION = "condition"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Pairs each expression sequence with a face of the reference image. Characters are the people "
                   "of 'expression', then of expression_2, 3, 4, in order.")

    @classmethod
    def VALIDATE_INPUTS(cls, face_order=None):
        """Checked when the prompt is queued, before anything runs (a linked value arrives as None)."""
        if face_order is not None:
            try:
                parse_face_order(face_order)
            except InputError as e:
                return str(e)
        return True

    def condition(self, faces, expression, portrait_scale=1.0, assignment="left_to_right", face_order="", masks=None,
                  **more):
        order = P.parse_face_order(face_order)
        user_masks_in = None if masks is None else host.masks_to_tensor(masks, "masks")
        drivers = list(expression)
        for i in range(2, 2 + MAX_EXTRA_EXPRESSIONS):
            drivers += list(more.get(f"expression_{i}") or [])
        if not drivers:
            raise InputError("expression holds no character; connect Encode Expression")
        chosen = P.assign_faces(faces.faces, len(drivers), order, assignment,
                                [P.driver_embedding(d) for d in drivers])
        user_masks: list = [None] * len(drivers)
        if user_masks_in is not None:
            m = user_masks_in
            if m.shape[0] != len(drivers):
                raise InputError(f"masks has {m.shape[0]} mask(s) for {len(drivers)} character(s); give one per "
                                 f"character (batch in character order)")
            mh, mw = m.shape[-2:]
            if abs(mw / mh - faces.width / faces.height) > 0.01 * faces.width / faces.height:
                raise InputError(f"masks are {mw}x{mh} but the reference image is {faces.width}x{faces.height} (another "
                                 f"aspect ratio); draw the masks on the reference image or crop them to its shape")
            user_masks = [mi if mi.max() > 0.5 else None for mi in m]
        numbers = P.face_numbers(chosen, faces.faces)
        unused = [k for k in range(len(faces.faces)) if k not in numbers]
        if unused:
            log.warning("[FantasyPortrait] reference face(s) %s have no driving expression and stay as in the image",
                          ", ".join(f"#{k}" for k in unused))
        canvas = faces.image if faces.image is not None else np.full((faces.height, faces.width, 3), 40, np.uint8)
        preview = draw_faces(canvas, chosen + [faces.faces[k] for k in unused],
                             labels=[f"face #{numbers[i]} <- character {i}" for i in range(len(chosen))]
                             + [f"face #{k}: no driver" for k in unused])
        return (PortraitInputs(chosen, drivers, faces.width, faces.height, portrait_scale, user_masks),
                host.uint8_to_image(preview))
