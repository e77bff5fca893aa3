"""PD-FGC implicit expression encoder (``FanEncoder``) and the 5-point face alignment it expects.

Architecture and parameter names: reference ``diffsynth/models/pdf.py`` (``FanEncoder``,
``FAN_use``, ``HourGlass``, ``ConvBlock``), itself from PD-FGC (Wang et al., CVPR 2023).
Alignment: ``warp_face_pd_fgc`` (Umeyama similarity on 5 landmarks into a 224×224 crop).

Per aligned face crop (RGB, ``[-1, 1]``, 224×224) the encoder returns headpose 6, eye 6,
emotion 30 and mouth 512 features (the mouth ones are the raw ``to_mouth`` output).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fantasyportrait_core.model.adapter import EXPRESSION_DIM

CROP_SIZE = 224
# Destination of (left eye, right eye, nose tip, left mouth corner, right mouth corner) in image
# terms (left = smaller x), as fractions of the crop (reference ``warp_face_pd_fgc``).
ALIGN_TEMPLATE = np.array(
    [[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]], dtype=np.float64
)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src to dst.

    Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", PAMI 1991, eqs. 38–43 (as in the reference ``umeyama(..., estimate_scale=True)``).

    Args:
        src, dst: ``[N, 2]`` float points, N >= 2.
    Returns:
        ``[2, 3]`` float64 affine matrix for ``cv2.warpAffine``.
    Raises:
        ValueError: for degenerate points (all equal), where no transform exists.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    var = src_d.var(axis=0).sum()
    if var <= 1e-12:
        raise ValueError("face landmarks are degenerate (all at one point); cannot align the face")
    cov = dst_d.T @ src_d / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Warp a face to the PD-FGC 224×224 template.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        landmarks5: ``[5, 2]`` pixel (x, y): left eye, right eye, nose tip, left/right mouth
            corner, left/right in image terms.
    Returns:
        ``[size, size, 3]`` uint8 RGB crop (bicubic, as the reference).
    """
    m = umeyama(landmarks5, ALIGN_TEMPLATE * size)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC)


def crops_to_tensor(crops: np.ndarray) -> torch.Tensor:
    """``[F, 224, 224, 3]`` uint8 RGB -> ``[F, 3, 224, 224]`` float32 in ``[-1, 1]`` (reference
    ``np_bgr_to_tensor`` after its BGR->RGB)."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN bottleneck: three pre-activated 3×3 convs (out/2, out/4, out/4) concatenated + residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = _conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = _conv3x3(cout // 4, cout // 4)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(True), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), 1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass of depth ``depth`` on 256 channels (modules ``b1_L, b2_L, b3_L, b2_plus_1``)."""

    def __init__(self, depth: int = 4, features: int = 256):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))
        self.add_module("b2_plus_1", ConvBlock(features, features))

    def _forward(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up1 = self._modules[f"b1_{level}"](x)  # reference dropout is a no-op in eval
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        low = self._forward(level - 1, low) if level > 1 else self._modules["b2_plus_1"](low)
        low = self._modules[f"b3_{level}"](low)
        return up1 + F.interpolate(low, size=up1.shape[2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.depth, x)


class FanBackbone(nn.Module):
    """``FAN_use``: FAN stem + one hourglass + 68 heatmaps, reduced to a 512 feature (``fc``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        self.m0 = HourGlass(4, 256)
        self.top_m_0 = ConvBlock(256, 256)
        self.conv_last0 = nn.Conv2d(256, 256, kernel_size=1)
        self.l0 = nn.Conv2d(256, 68, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(256)
        self.conv6 = nn.Conv2d(68, 1, 3, 2, 1)
        self.fc = nn.Linear(28 * 28, 512)
        self.bn5 = nn.BatchNorm2d(68)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, 3, 224, 224]`` -> ``[B, 512]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.conv4(self.conv3(x))
        ll = self.top_m_0(self.m0(x))
        ll = self.bn_end0(self.conv_last0(ll))
        heat = self.l0(F.relu(ll))
        net = self.conv6(F.relu(self.bn5(heat)))
        return self.fc(F.relu(net.flatten(1)))


def _head(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Linear(512, out_dim))


class FanEncoder(nn.Module):
    """PD-FGC ``FanEncoder``: aligned face crops -> headpose 6, eye 6, emotion 30, mouth 512.

    Reference: ``FanEncoder`` in ``diffsynth/models/pdf.py`` (pose_dim 6, eye_dim 6). ``mouth_embed``
    is part of the checkpoint but unused at inference (the adapter reads raw ``to_mouth``).
    """

    def __init__(self, pose_dim: int = 6, eye_dim: int = 6):
        super().__init__()
        self.model = FanBackbone()
        self.to_mouth = _head(512)
        self.mouth_embed = nn.Sequential(nn.ReLU(), nn.Linear(512, 512 - pose_dim - eye_dim))
        self.to_headpose = _head(512)
        self.headpose_embed = nn.Sequential(nn.ReLU(), nn.Linear(512, pose_dim))
        self.to_eye = _head(512)
        self.eye_embed = nn.Sequential(nn.ReLU(), nn.Linear(512, eye_dim))
        self.to_emo = _head(512)
        self.emo_embed = nn.Sequential(nn.ReLU(), nn.Linear(512, 30))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, 3, 224, 224]`` RGB in ``[-1, 1]`` -> ``[B, 554]`` (headpose, eye, emotion, mouth).

        Must run in eval mode (BatchNorm running statistics), as the reference does.
        """
        feat = self.model(x)
        headpose = self.headpose_embed(self.to_headpose(feat))
        eye = self.eye_embed(self.to_eye(feat))
        emo = self.emo_embed(self.to_emo(feat))
        mouth = self.to_mouth(feat)
        return torch.cat([headpose, eye, emo, mouth], dim=1)


@torch.no_grad()
def encode_expressions(encoder: FanEncoder, crops: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """Expression features of aligned face crops, batched.

    Args:
        encoder: :class:`FanEncoder` (put in eval mode here).
        crops: ``[F, 224, 224, 3]`` uint8 RGB from :func:`align_face`.
        batch_size: crops per forward (memory bound; results do not depend on it in eval mode).
    Returns:
        float32 ``[F, 554]`` on the CPU.
    Raises:
        ValueError: if ``crops`` is empty or not 224×224×3.
    """
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or len(crops) == 0:
        raise ValueError(f"crops must be [F>0, {CROP_SIZE}, {CROP_SIZE}, 3] uint8, got {crops.shape}")
    encoder.eval()
    # channels-last convolutions: same values (to fp32 round-off), ~1.3x faster on CPU (oneDNN) and the
    # layout cuDNN prefers; converting the module is a no-op after the first call.
    encoder.to(memory_format=torch.channels_last)
    p = next(encoder.parameters())
    if p.device.type == "cpu":
        batch_size = min(batch_size, 8)  # smaller batches stay in cache: ~15 % faster per crop on CPU
    out = []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size]).to(p.device, p.dtype)
        out.append(encoder(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    feats = torch.cat(out)
    assert feats.shape[1] == EXPRESSION_DIM
    return feats
