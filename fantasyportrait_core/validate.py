"""Cheap checks of user input, run before any detection, encoding or sampling.

Every check raises :class:`InputError` with one line that names the input, says what was wrong and
how to fix it. The CLI prints that line without a traceback; in ComfyUI it is the node's error.
The same functions serve the CLI (:func:`~fantasyportrait_core.runtime.plan.plan_run` on the :class:`~fantasyportrait_core.runtime.job.Job` it builds) and the
nodes (``VALIDATE_INPUTS`` and the checks at the top of each node function), so a bad value gets
the same words everywhere.
"""

from __future__ import annotations

import math
import os
import tempfile

# Containers the writer fills with H.264 + AAC (``video.write_video``).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")
# Smallest image side the face detectors can find a face in (MTCNN's smallest face is 20 px and
# needs a margin around it; the aligned crop is 224 px).
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 8192


class InputError(ValueError):
    """A user mistake (bad value, path, file or combination of inputs): one line naming the input,
    what was wrong and the fix. Subclasses ``ValueError`` so callers catching that keep working."""


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """``value`` as an int in ``[lo, hi]``.

    Raises:
        InputError: naming ``name``, the value, the allowed range and ``fix``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{name} must be {_range(lo, hi)}, got {value}" + (f"; {fix}" if fix else ""))
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                fix: str = "") -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

    Raises:
        InputError: for NaN, infinity or a value out of range, naming ``name``.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise InputError(f"{name} must be {_range(lo, hi, lo_open)}, got {v:g}" + (f"; {fix}" if fix else ""))
    return v


def _range(lo, hi, lo_open=False) -> str:
    if lo is not None and hi is not None:
        return f"{'above' if lo_open else 'between'} {lo:g}" + (f" and at most {hi:g}" if lo_open else f" and {hi:g}")
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}"


def parse_face_order(text: str | None, name: str = "face_order") -> list[int] | None:
    """``"1,0"`` -> ``[1, 0]`` (face numbers as shown on the face preview, reading order from 0);
    empty -> ``None`` (the assignment mode decides).

    Raises:
        InputError: for anything but distinct non-negative comma-separated integers.
    """
    text = (text or "").strip()
    if not text:
        return None
    parts = [t for t in text.replace(" ", "").split(",") if t != ""]
    try:
        order = [int(t) for t in parts]
    except ValueError:
        raise InputError(f"{name} '{text}' must be comma-separated face numbers like '1,0' "
                         "(the numbers on the face preview)") from None
    if any(i < 0 for i in order):
        raise InputError(f"{name} '{text}': face numbers start at 0; use the numbers on the face preview")
    if len(set(order)) != len(order):
        raise InputError(f"{name} '{text}' names a face twice; each character needs its own face")
    return order


def check_face_order(order: list[int] | None, characters: int, faces: int | None = None,
                     name: str = "face_order") -> list[int] | None:
    """Check a parsed face order against the character count and (once known) the face count.

    Raises:
        InputError: wrong length or a face number the reference does not have.
    """
    if order is None:
        return None
    if any(i < 0 for i in order) or len(set(order)) != len(order):
        raise InputError(f"{name} {order} must list distinct face numbers from 0; each character needs its own face")
    if len(order) != characters:
        raise InputError(f"{name} lists {len(order)} face(s) for {characters} character(s); give one face number "
                         f"per character, e.g. '{','.join(str(i) for i in range(characters))}'")
    if faces is not None and max(order) >= faces:
        numbers = "number 0" if faces == 1 else f"numbered 0 to {faces - 1}"
        raise InputError(f"{name} uses face {max(order)} but the reference image has {faces} face(s) ({numbers} on "
                         f"the face preview)")
    return order


def check_input_file(path: str | None, name: str, what: str = "file") -> str:
    """An existing, readable, non-empty file.

    Raises:
        InputError: naming ``name`` and the path.
    """
    if not path:
        raise InputError(f"{name} is empty; give the path of the {what}")
    if os.path.isdir(path):
        raise InputError(f"{name} '{path}' is a folder; give the path of the {what}")
    if not os.path.isfile(path):
        raise InputError(f"{name} '{path}' not found; check the path of the {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} '{path}' cannot be read (permissions)")
    if os.path.getsize(path) == 0:
        raise InputError(f"{name} '{path}' is an empty file; copy or download it again")
    return path


def check_input_dir(path: str | None, name: str, what: str = "folder") -> str:
    if not path or not os.path.isdir(path):
        raise InputError(f"{name} '{path}' is not a folder; give the {what}")
    return path


def check_output_path(path: str | None, name: str = "--out", extensions=VIDEO_EXTENSIONS) -> str:
    """A video path that can be written: a known container extension, not a folder, its folder
    creatable and writable (checked by creating and removing a temporary file there).

    Returns:
        The absolute path.
    Raises:
        InputError: naming the path and the fix.
    """
    if not path:
        raise InputError(f"{name} is empty; give a file name such as out.mp4")
    if os.path.isdir(path):
        raise InputError(f"{name} '{path}' is an existing folder; give a file name inside it, e.g. "
                         f"{os.path.join(path, 'out.mp4')}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise InputError(f"{name} '{path}': cannot write a '{ext or 'extensionless'}' file; the output is H.264 video, "
                         f"use one of {', '.join(extensions)}")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{name} '{path}': '{parent}' is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fp_write_check_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{name} '{path}': cannot write in {folder} ({e.strerror or e}); choose another folder") from None
    return os.path.abspath(path)


def check_image_size(width: int, height: int, name: str, min_side: int = MIN_IMAGE_SIDE,
                     max_side: int = MAX_IMAGE_SIDE) -> None:
    """Raises InputError for images too small to hold a detectable face or absurdly large."""
    if min(width, height) < min_side:
        raise InputError(f"{name} is {width}x{height}; a face cannot be found in an image under {min_side} px on a "
                         f"side: use a larger image")
    if max(width, height) > max_side:
        raise InputError(f"{name} is {width}x{height}; images over {max_side} px on a side are not supported: "
                         f"downscale it")
