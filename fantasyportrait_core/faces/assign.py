"""Which reference face each character animates: the reference's faces in reading order
(:func:`detect_reference`), the assignment (:func:`assign_faces`) and one numbering of them for
reports and previews (:func:`face_roles`)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from fantasyportrait_core.faces.face import Face, in_reading_order

if TYPE_CHECKING:
    from fantasyportrait_core.drive.encode import DrivingExpression


ASSIGN_MODES = ("left_to_right", "right_to_left", "largest_first", "identity")


def detect_reference(detector, image: np.ndarray) -> list[Face]:
    """Faces of a reference image, numbered in reading order (:func:`~fantasyportrait_core.faces.face.reading_order`):
    the numbers the face preview shows and ``face_order`` takes."""
    return in_reading_order(detector.detect(image))


def assign_faces(faces: list[Face], count: int, order: list[int] | None = None, mode: str = "left_to_right",
                 driver_embeddings: list[np.ndarray | None] | None = None, order_name: str = "face_order") -> list[Face]:
    """Pick the reference face each of ``count`` characters animates; never by file order.

    ``faces`` are numbered in reading order (:func:`detect_reference`). Modes: ``left_to_right`` —
    character i takes face i in reading order (rows top to bottom, left to right in a row; one
    character: the largest face); ``right_to_left`` — the reverse reading order; ``largest_first``
    — character i takes the i-th largest face; ``identity`` — the assignment maximising the total
    cosine similarity between each character's driving-face embedding and the reference faces'
    embeddings (backends with embeddings, e.g. insightface). ``order[i]`` (a face number) overrides
    everything.

    Raises:
        InputError: no face, fewer faces than characters (names both counts), a bad ``order``,
            an unknown mode, or identity mode without embeddings.
    """
    from fantasyportrait_core.validate import InputError, check_face_order

    if not faces:
        raise InputError("no face found in the reference image; use a clearer, larger or more frontal face")
    if len(faces) < count:
        raise InputError(f"the reference image shows {len(faces)} face(s) but {count} driving expression sequence(s) "
                         f"(characters) were given; give at most {len(faces)} or use a reference with more faces")
    if order:
        check_face_order(order, count, len(faces), order_name)
        return [faces[i] for i in order]
    if mode == "left_to_right":
        return [max(faces, key=lambda f: f.area)] if count == 1 else list(faces[:count])
    if mode == "right_to_left":
        return list(faces[::-1][:count])
    if mode == "largest_first":
        return sorted(faces, key=lambda f: -f.area)[:count]
    if mode == "identity":
        if driver_embeddings is None or any(e is None for e in driver_embeddings) or \
                any(f.embedding is None for f in faces):
            raise InputError("identity assignment needs identity embeddings for the reference and driving faces: "
                             "use the insightface face detector, or another assignment")
        sim = np.array([[float(np.dot(d, f.embedding) / (np.linalg.norm(d) * np.linalg.norm(f.embedding) + 1e-9))
                         for f in faces] for d in driver_embeddings])
        best = max(itertools.permutations(range(len(faces)), count), key=lambda p: sum(sim[i, j] for i, j in enumerate(p)))
        return [faces[j] for j in best]
    raise InputError(f"unknown assignment mode {mode!r}; choose one of {ASSIGN_MODES}")


def face_numbers(chosen: list[Face], faces: list[Face]) -> list[int]:
    """The face number (index in ``faces``, reading order) of each chosen face."""
    index = {id(f): k for k, f in enumerate(faces)}
    return [index[id(f)] for f in chosen]


def face_roles(chosen: list[Face], faces: list[Face], drivers: list["DrivingExpression"]):
    """One numbering of the reference faces for reports and previews: ``(numbers, unused, shown,
    labels)`` with the face number each character animates, the face numbers no character drives,
    the faces to draw (chosen, then unused) and their labels (``face #1 <- video.mp4``, ``face #2:
    no driver``), in the numbers ``face_order`` takes."""
    numbers = face_numbers(chosen, faces)
    unused = [k for k in range(len(faces)) if k not in numbers]
    labels = [f"face #{numbers[i]} <- {d.label}" for i, d in enumerate(drivers)]
    labels += [f"face #{k}: no driver" for k in unused]
    return numbers, unused, chosen + [faces[k] for k in unused], labels


def driver_embedding(driver: "DrivingExpression") -> np.ndarray | None:
    """Mean identity embedding of a driving track (``None`` when the backend gives none)."""
    embs = driver.track.embeddings
    return np.mean(embs, axis=0) if embs else None
