"""Expression, face and conditioning nodes: driving IMAGE -> expressions; reference IMAGE -> faces;
both -> FP_PORTRAIT for the sampler."""

from __future__ import annotations

import hashlib
import itertools
import os
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core.runtime.job import widget_range
from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.faces.assign import ASSIGN_MODES, assign_faces, detect_reference, driver_embedding, face_roles
from fantasyportrait_core.runtime.residency import on_device
from fantasyportrait_core.validate import parse_face_order
from fantasyportrait_core.faces.face import Face
from fantasyportrait_core.faces.regions import box_masks
from fantasyportrait_core.faces.preview import add_caption, detector_label, draw_faces
from fantasyportrait_core.media.video import OUTPUT_FPS, resample_indices
from fantasyportrait_core.validate import InputError, parse_face_order

from . import host

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait"
MAX_EXTRA_EXPRESSIONS = 3  # expression + expression_2..4
_EXPRESSION_CACHE: "OrderedDict[tuple, list]" = OrderedDict()  # content hash -> drivers, across prompts
_EXPRESSION_CACHE_SIZE = 8
_TOKENS: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_NEXT_TOKEN = itertools.count()


def _token(obj) -> int:
    """A number that names ``obj`` for as long as it lives and is never given to another object.

    ``id()`` is not such a name: CPython reuses the address of a freed object, so an encoder loaded
    after another was freed could be served the freed one's cached features. When ``obj`` is freed,
    the cache entries made with it are dropped too.
    """
    tok = _TOKENS.get(obj)
    if tok is None:
        tok = _TOKENS[obj] = next(_NEXT_TOKEN)
        weakref.finalize(obj, _forget_token, tok)
    return tok


def _forget_token(tok: int) -> None:
    for key in [k for k in _EXPRESSION_CACHE if tok in k[-2:]]:
        del _EXPRESSION_CACHE[key]


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
    drivers: list[drive_encode.DrivingExpression]
    ref_width: int
    ref_height: int
    scale: float = 1.0
    user_masks: list[torch.Tensor | None] = field(default_factory=list)


MEDIA_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp", ".png", ".jpg", ".jpeg")


def source_name(prompt: dict | None, node_id, input_name: str = "images", max_depth: int = 8) -> str | None:
    """The file name of the video feeding ``input_name`` of node ``node_id`` in an API ``prompt``:
    follows links upstream (e.g. Encode Expression ← Get Video Components ← Load Video) to the
    first node holding a media file name (``LoadVideo.file``, VHS ``video``, ...). ``None`` when
    there is none (frames made by other nodes)."""
    if not prompt or node_id is None or str(node_id) not in prompt:
        return None
    todo = [(prompt[str(node_id)].get("inputs", {}).get(input_name), 0)]
    seen = set()
    while todo:
        ref, depth = todo.pop(0)
        if not (isinstance(ref, list) and len(ref) == 2) or depth > max_depth or str(ref[0]) in seen:
            continue
        seen.add(str(ref[0]))
        inputs = prompt.get(str(ref[0]), {}).get("inputs", {})
        for v in inputs.values():
            if isinstance(v, str) and v.lower().split("?")[0].endswith(MEDIA_EXTENSIONS):
                return os.path.basename(v.replace("\\", "/").split(" [")[0])
        todo += [(v, depth + 1) for v in inputs.values() if isinstance(v, list)]
    return None


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
            "smooth": ("FLOAT", {"default": 0.0, **widget_range("smooth"), "step": 0.1,
                                 "tooltip": "Extra Gaussian smoothing of the face landmarks (sigma in frames) after "
                                            "the landmark filter, for a jittery detector; it blurs fast moves "
                                            "too. 0 = none (the reference applies only the One-Euro filter)."}),
        }, "optional": {  # newer inputs: optional, so API prompts saved by earlier versions still validate
            "landmark_filter": (list(drive_encode.LANDMARK_FILTERS), {"default": "one_euro", "tooltip":
                                "one_euro: the reference's adaptive One-Euro filter on the landmarks (holds a "
                                "still face still, follows fast moves at once), as the model was trained. "
                                "none: raw detector landmarks."}),
            "source_fps": ("FLOAT", {"default": OUTPUT_FPS, "min": 1.0, "max": 240.0, "step": 0.001, "tooltip":
                                     "Frame rate of these frames: connect Get Video Components' fps."}),
            "fps": ("FLOAT", {"default": OUTPUT_FPS, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip":
                              "Output frame rate: the frames are resampled to it (nearest frame in time) before "
                              "encoding, so drivers at different rates stay in step. The reference's multi-character script uses 25; its single-character script keeps the driver's rate."}),
            "max_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                   "Frames to detect and encode (at the output fps, from start_frame): set it to "
                                   "WanImageToVideo's length so a long clip is not encoded in full. 0 = all. The "
                                   "reference reads only the frames it generates."}),
            "start_frame": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                    "First driving frame to use, counted at the output fps (0 = the first)."}),
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("FP_EXPRESSION", "IMAGE", "STRING")
    RETURN_NAMES = ("expression", "aligned_faces", "info")
    OUTPUT_TOOLTIPS = ("Expression sequences, one per person, at the output frame rate.",
                       "The aligned 224×224 face crops the encoder saw (first person).",
                       "Per person: which video and face, frame count and rate (and resampling), frames "
                       "without a face (filled from neighbours).")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Resamples the driving frames to the output frame rate, detects and tracks faces, smooths "
                   "the landmarks as the reference does, aligns each face on 5 landmarks and encodes its "
                   "headpose, eyes, emotion and mouth. Frames without a face are filled from neighbours.")

    def encode(self, expression_encoder, face_detector, images, people=1, smooth=0.0, landmark_filter="one_euro",
               source_fps=OUTPUT_FPS, fps=OUTPUT_FPS, max_frames=0, start_frame=0, prompt=None, unique_id=None):
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        n = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim == 4 else 0
        if not n:  # not an IMAGE batch, or an empty one: this check raises, naming the input
            host.image_to_uint8(images, "images (driving frames)")
            raise InputError("images (driving frames) must be an IMAGE batch [frames, height, width, 3]")
        source = source_name(prompt, unique_id) or (f"Encode Expression {unique_id}" if unique_id else "driver")
        idx = resample_indices(n, float(source_fps), float(fps))
        resampled = len(idx) != n or not np.array_equal(idx, np.arange(n))
        rate = (f"{len(idx)} frames at {fps:g} fps (resampled from {n} at {source_fps:g} fps)"
                if resampled else f"{len(idx)} frames at {fps:g} fps")
        if start_frame >= len(idx):
            raise InputError(f"start_frame {start_frame} is past the end of the {len(idx)} driving frames (at {fps:g} "
                             f"fps); lower it")
        if start_frame or 0 < max_frames < len(idx) - start_frame:
            idx = idx[start_frame:start_frame + max_frames if max_frames else None]
            rate += f", frames {start_frame}..{start_frame + len(idx) - 1} encoded (start_frame, max_frames)"
        # only the frames that are encoded are converted
        frames = host.image_to_uint8(images[torch.as_tensor(idx)], "images (driving frames)")
        # The same driving clip queued again (other seed, prompt or reference) is not re-encoded,
        # even when ComfyUI's own cache was invalidated by other prompts in between.
        key = (_frames_key(frames), people, float(smooth), landmark_filter, float(fps), source,
               _token(face_detector), _token(expression_encoder))
        drivers = _EXPRESSION_CACHE.get(key)
        if drivers is None:
            device = host.torch_device()
            with on_device(expression_encoder, device):
                drivers = drive_encode.encode_driving(face_detector, expression_encoder, frames, people=people,
                                                      smooth=smooth, landmark_filter=landmark_filter, source=source,
                                                      fps=float(fps), progress=host.progress)
            _EXPRESSION_CACHE[key] = drivers
            while len(_EXPRESSION_CACHE) > _EXPRESSION_CACHE_SIZE:
                _EXPRESSION_CACHE.popitem(last=False)
        else:
            _EXPRESSION_CACHE.move_to_end(key)
        info = [f"detector: {detector_label(face_detector)}"]
        if drivers[0].people_seen > len(drivers):
            info.append(f"the video shows {drivers[0].people_seen} people; {len(drivers)} used (raise people to use more)")
        for d in drivers:
            miss = d.track.missing
            info.append(f"{d.label}: {rate}, {len(miss)} without a face"
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
    DESCRIPTION = ("Finds the faces of the reference portrait, numbers them left to right (#0 = leftmost) and "
                   "gives one box mask per face. The numbers are the ones face_order uses on Portrait "
                   "Conditioning.")

    def detect(self, face_detector, image):
        ref = host.image_to_uint8(image[:1] if isinstance(image, torch.Tensor) and image.ndim == 4 else image,
                                  "image (reference)")[0]
        faces = detect_reference(face_detector, ref)
        if not faces:
            raise InputError("no face found in the reference image; use a clearer, larger or more frontal face")
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
            "portrait_scale": ("FLOAT", {"default": 1.0, **widget_range("portrait_scale"), "step": 0.05,
                                         "tooltip": "Strength of the expression branch inside the transformer."}),
            "assignment": (list(ASSIGN_MODES), {"default": "left_to_right", "tooltip":
                           "Which face each character animates: left_to_right (one character: the largest face), "
                           "right_to_left, largest_first, or identity (closest-looking face; needs the insightface "
                           "detector)."}),
            "face_order": ("STRING", {"default": "", "tooltip":
                                      "Overrides assignment: the face number (from the Face Masks preview, reading "
                                      "order from 0) of each character, e.g. '1,0'. Empty = use assignment."}),
        }, "optional": optional}

    RETURN_TYPES = ("FP_PORTRAIT", "IMAGE", "FLOAT")
    RETURN_NAMES = ("portrait", "preview", "fps")
    OUTPUT_TOOLTIPS = ("Characters (face + expression sequence each) for the FantasyPortrait Sampler.",
                       "The reference with each animated face labelled by the video track driving it, "
                       "e.g. 'face #1 <- drive3.mp4 #0'.",
                       "The drivers' frame rate (Encode Expression fps): connect Create Video's fps.")
    FUNCTION = "condition"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Pairs each expression sequence with a face of the reference image. Characters are the people "
                   "of 'expression', then of expression_2, 3, 4, in order; the preview shows which video track "
                   "drives which face.")

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
        order = parse_face_order(face_order)
        user_masks_in = None if masks is None else host.masks_to_tensor(masks, "masks")
        drivers = list(expression)
        for i in range(2, 2 + MAX_EXTRA_EXPRESSIONS):
            drivers += list(more.get(f"expression_{i}") or [])
        if not drivers:
            raise InputError("expression holds no character; connect Encode Expression")
        chosen = assign_faces(faces.faces, len(drivers), order, assignment,
                              [driver_embedding(d) for d in drivers])
        from .direct import resolve_directions  # Direct Expression: applied against the face each character animates

        drivers = resolve_directions(drivers, chosen)
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
        rates = sorted({d.fps for d in drivers if d.fps is not None})
        if len(rates) > 1:
            raise InputError(f"the drivers come at different frame rates {rates} fps: set the same fps on every "
                             f"Encode Expression")
        numbers, unused, shown, labels = face_roles(chosen, faces.faces, drivers)
        if unused:
            log.warning("[FantasyPortrait] reference face(s) %s have no driving expression and stay as in the image",
                        ", ".join(f"#{k}" for k in unused))
        canvas = faces.image if faces.image is not None else np.full((faces.height, faces.width, 3), 40, np.uint8)
        preview = draw_faces(canvas, shown, labels=labels)
        return (PortraitInputs(chosen, drivers, faces.width, faces.height, portrait_scale, user_masks),
                host.uint8_to_image(preview), float(rates[0] if rates else OUTPUT_FPS))
