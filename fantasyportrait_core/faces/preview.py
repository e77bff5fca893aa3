"""Preview images: reference faces with numbered boxes, regions and the latent person map."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from fantasyportrait_core.faces.face import Face

# Distinct colours (RGB) for up to 8 characters, then repeating.
PALETTE = np.array([(230, 60, 60), (60, 130, 230), (60, 190, 90), (230, 170, 40),
                    (170, 80, 210), (40, 200, 200), (240, 120, 180), (150, 150, 150)], dtype=np.uint8)


def draw_faces(image: np.ndarray, faces: list[Face], regions: np.ndarray | None = None,
               latent_person: torch.Tensor | None = None, labels: list[str] | None = None,
               min_side: int = 768) -> np.ndarray:
    """Draw what the pipeline sees on a copy of ``image`` (``[H, W, 3]`` uint8 RGB).

    Each face i gets colour i, its box, its 5 landmarks and the label ``#i`` (or ``labels[i]``, e.g.
    ``"face #1 <- drive3.mp4 #0"``: which track of which video drives it; shrunk to fit the width);
    ``regions`` are drawn as thin rectangles; ``latent_person`` (``[F_lat, h·w]``, frame 0 shown)
    tints the tokens each person's expression tokens reach. Small images are drawn enlarged so
    that the longest side is at least ``min_side`` (labels stay legible).
    """
    h0, w0 = image.shape[:2]
    k = max(1.0, min_side / max(h0, w0))
    out = cv2.resize(image, (round(w0 * k), round(h0 * k)), interpolation=cv2.INTER_CUBIC) if k > 1 else image.copy()
    h, w = out.shape[:2]
    if latent_person is not None:
        gh, gw = h0 // 16, w0 // 16
        ids = latent_person[0].reshape(gh, gw).cpu().numpy()
        ids = cv2.resize(ids.astype(np.uint8), (round(gw * 16 * k), round(gh * 16 * k)), interpolation=cv2.INTER_NEAREST)
        tint = np.zeros_like(out)
        tint[: ids.shape[0], : ids.shape[1]] = np.where(ids[..., None] > 0, PALETTE[(ids - 1) % len(PALETTE)], 0)
        fg = np.zeros(out.shape[:2], bool)
        fg[: ids.shape[0], : ids.shape[1]] = ids > 0
        out[fg] = (0.55 * out[fg] + 0.45 * tint[fg]).astype(np.uint8)
    thick = max(2, round(max(h, w) / 400))
    for i, face in enumerate(faces):
        color = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        x1, y1, x2, y2 = (int(round(v * k)) for v in face.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        if regions is not None and i < len(regions):
            rx1, ry1, rx2, ry2 = (int(round(v * k)) for v in regions[i])
            cv2.rectangle(out, (rx1, ry1), (rx2, ry2), color, max(1, thick // 2))
        for x, y in face.landmarks:
            cv2.circle(out, (int(round(x * k)), int(round(y * k))), thick + 1, (255, 255, 255), -1)
        label = labels[i] if labels else f"#{i}"
        scale = max(0.5, max(h, w) / 900)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        if tw > w - 4:  # a long label ("face #1 <- a_long_file_name.mp4 #0") shrinks to fit the width
            scale *= (w - 4) / tw
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        tx = int(min(max(x1, 2), w - tw - 2))  # keep the label inside the image
        ty = int(y1 - 6 if y1 - 6 > th else min(y2 + th + 6, h - 2))
        cv2.putText(out, label, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    return out


def detector_label(detector) -> str:
    """What a preview or report says about the face detector: its ``info`` line (the backend that
    ran and, for ``auto``, why), else its ``name``."""
    return getattr(detector, "info", None) or getattr(detector, "name", type(detector).__name__)


def add_caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (``[H, W, 3]`` uint8 RGB) with ``text`` written on a dark band along its bottom edge
    (same size; the text is shrunk to fit the width)."""
    out = image.copy()
    h, w = out.shape[:2]
    scale = max(0.4, min(h, w) / 1400)
    thick = max(1, round(scale * 1.5))
    tw = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
    if tw > w - 8:
        scale *= (w - 8) / tw
    (_, th), base = cv2.getTextSize("Ag(|)", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)  # same band for any text
    band = th + base + 8
    out[h - band:] = (0.35 * out[h - band:]).astype(np.uint8)
    cv2.putText(out, text, (4, h - base - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out
