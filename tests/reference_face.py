"""Literal port of FantasyPortrait's face detection, 222-point landmarks and PD-FGC alignment, for
parity tests and the detector benchmark only (never imported by the node pack).

Ported by reading Fantasy-AMAP/fantasy-portrait at commit 4df229c (``git show HEAD:<file>``):

* ``diffsynth/models/face_det.py``: ``get_resize_matrix``, ``warp_boxes``, ``hard_nms``, ``iou_of``,
  ``area_of``, ``NanoDetABC`` (``preprocess``, ``postprocess``, ``detect``), ``FaceDet``;
* ``diffsynth/models/face_utils.py``: ``get_warp_mat_bbox``, ``transform_points``,
  ``get_warp_mat_bbox_by_gt_pts_float``, ``OneEuroFilter``;
* ``diffsynth/models/face_align.py``: ``FaceAlignment`` (``onnx_infer``, ``forward``);
* ``diffsynth/models/camer.py``: ``Smoother222``, ``CameraDemo`` (the tracker ``det_landmarks`` runs);
* ``diffsynth/models/pdf.py``: ``umeyama``, ``warp_face_pd_fgc``, ``det_landmarks``.

Kept as written, quirks included (they are what the model was trained with): boxes truncated to
int32, the refinement passes taking the roll measured in the previous 128² crop, the
"largest face" loop of ``FaceAlignment.forward`` that updates ``max_area`` on every box. Changed
only where nothing numeric changes: ``scipy.special.softmax`` written out (scipy is not a
dependency), the ONNX session opened without ``onnx.checker`` and with the CPU provider, no prints,
no tqdm, ``Smoother222``'s seven copy-pasted branches written once as a table of the same
thresholds, ``CameraDemo``'s two identical "new tracking object" branches written once.
"""

from __future__ import annotations

import cv2
import numpy as np


def _softmax(x, axis):  # scipy.special.softmax
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def create_onnx_session(onnx_path):
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- face_det.py

def get_resize_matrix(raw_shape, dst_shape, keep_ratio):
    r_w, r_h = raw_shape
    d_w, d_h = dst_shape
    Rs = np.eye(3)
    if keep_ratio:
        C = np.eye(3)
        C[0, 2] = -r_w / 2
        C[1, 2] = -r_h / 2
        if r_w / r_h < d_w / d_h:
            ratio = d_h / r_h
        else:
            ratio = d_w / r_w
        Rs[0, 0] *= ratio
        Rs[1, 1] *= ratio
        T = np.eye(3)
        T[0, 2] = 0.5 * d_w
        T[1, 2] = 0.5 * d_h
        return T @ Rs @ C
    Rs[0, 0] *= d_w / r_w
    Rs[1, 1] *= d_h / r_h
    return Rs


def warp_boxes(boxes, M, width, height):
    n = len(boxes)
    if n:
        xy = np.ones((n * 4, 3))
        xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
        xy = xy @ M.T
        xy = (xy[:, :2] / xy[:, 2:3]).reshape(n, 8)
        x = xy[:, [0, 2, 4, 6]]
        y = xy[:, [1, 3, 5, 7]]
        xy = np.concatenate((x.min(1), y.min(1), x.max(1), y.max(1))).reshape(4, n).T
        xy[:, [0, 2]] = xy[:, [0, 2]].clip(0, width)
        xy[:, [1, 3]] = xy[:, [1, 3]].clip(0, height)
        return xy.astype(np.float32)
    return boxes


def area_of(left_top, right_bottom):
    hw = np.clip(right_bottom - left_top, 0.0, None)
    return hw[..., 0] * hw[..., 1]


def iou_of(boxes0, boxes1, eps=1e-5):
    overlap_left_top = np.maximum(boxes0[..., :2], boxes1[..., :2])
    overlap_right_bottom = np.minimum(boxes0[..., 2:], boxes1[..., 2:])
    overlap_area = area_of(overlap_left_top, overlap_right_bottom)
    area0 = area_of(boxes0[..., :2], boxes0[..., 2:])
    area1 = area_of(boxes1[..., :2], boxes1[..., 2:])
    return overlap_area / (area0 + area1 - overlap_area + eps)


def hard_nms(box_scores, iou_threshold, top_k=-1, candidate_size=200):
    scores = box_scores[:, -1]
    boxes = box_scores[:, :-1]
    picked = []
    indexes = np.argsort(scores)
    indexes = indexes[-candidate_size:]
    while len(indexes) > 0:
        current = indexes[-1]
        picked.append(current)
        if 0 < top_k == len(picked) or len(indexes) == 1:
            break
        current_box = boxes[current, :]
        indexes = indexes[:-1]
        rest_boxes = boxes[indexes, :]
        iou = iou_of(rest_boxes, np.expand_dims(current_box, axis=0))
        indexes = indexes[iou <= iou_threshold]
    return box_scores[picked, :]


class FaceDet:
    """``NanoDetABC`` + ``FaceDet`` with the reference's defaults."""

    def __init__(self, model_path, input_shape=(272, 160), reg_max=7, strides=(8, 16, 32), prob_threshold=0.4,
                 iou_threshold=0.3, num_candidate=1000, top_k=-1):
        self.strides = list(strides)
        self.input_shape = list(input_shape)
        self.reg_max = reg_max
        self.prob_threshold = prob_threshold
        self.iou_threshold = iou_threshold
        self.num_candidate = num_candidate
        self.top_k = top_k
        self.img_mean = [103.53, 116.28, 123.675]
        self.img_std = [57.375, 57.12, 58.395]
        self.input_size = (self.input_shape[1], self.input_shape[0])
        self.ort_session = create_onnx_session(model_path)
        self.input_name = self.ort_session.get_inputs()[0].name

    def preprocess(self, img):
        ResizeM = get_resize_matrix((img.shape[1], img.shape[0]), self.input_size, True)
        img_resize = cv2.warpPerspective(img, ResizeM, dsize=self.input_size)
        img_input = img_resize.astype(np.float32) / 255
        img_mean = np.array(self.img_mean, dtype=np.float32).reshape(1, 1, 3) / 255
        img_std = np.array(self.img_std, dtype=np.float32).reshape(1, 1, 3) / 255
        img_input = (img_input - img_mean) / img_std
        img_input = np.transpose(img_input, [2, 0, 1])
        img_input = np.expand_dims(img_input, axis=0)
        return img_input, ResizeM

    def postprocess(self, scores, raw_boxes, ResizeM, raw_shape):
        decode_boxes = []
        select_scores = []
        for stride, box_distribute, score in zip(self.strides, raw_boxes, scores):
            fm_h = self.input_shape[0] / stride
            fm_w = self.input_shape[1] / stride
            h_range = np.arange(fm_h)
            w_range = np.arange(fm_w)
            ww, hh = np.meshgrid(w_range, h_range)
            ct_row = hh.flatten() * stride
            ct_col = ww.flatten() * stride
            center = np.stack((ct_col, ct_row, ct_col, ct_row), axis=1)
            reg_range = np.arange(self.reg_max + 1)
            box_distance = box_distribute.reshape((-1, self.reg_max + 1))
            box_distance = _softmax(box_distance, axis=1)
            box_distance = box_distance * np.expand_dims(reg_range, axis=0)
            box_distance = np.sum(box_distance, axis=1).reshape((-1, 4))
            box_distance = box_distance * stride
            topk_idx = np.argsort(score.max(axis=1))[::-1]
            topk_idx = topk_idx[: self.num_candidate]
            center = center[topk_idx]
            score = score[topk_idx]
            box_distance = box_distance[topk_idx]
            decode_box = center + [-1, -1, 1, 1] * box_distance
            select_scores.append(score)
            decode_boxes.append(decode_box)
        bboxes = np.concatenate(decode_boxes, axis=0)
        confidences = np.concatenate(select_scores, axis=0)
        picked_box_probs = []
        picked_labels = []
        for class_index in range(0, confidences.shape[1]):
            probs = confidences[:, class_index]
            mask = probs > self.prob_threshold
            probs = probs[mask]
            if probs.shape[0] == 0:
                continue
            subset_boxes = bboxes[mask, :]
            box_probs = np.concatenate([subset_boxes, probs.reshape(-1, 1)], axis=1)
            box_probs = hard_nms(box_probs, iou_threshold=self.iou_threshold, top_k=self.top_k)
            picked_box_probs.append(box_probs)
            picked_labels.extend([class_index] * box_probs.shape[0])
        if not picked_box_probs:
            return np.array([]), np.array([]), np.array([])
        picked_box_probs = np.concatenate(picked_box_probs)
        picked_box_probs[:, :4] = warp_boxes(picked_box_probs[:, :4], np.linalg.inv(ResizeM), raw_shape[1],
                                             raw_shape[0])
        return picked_box_probs[:, :4].astype(np.int32), np.array(picked_labels), picked_box_probs[:, 4]

    def infer_image(self, img_input):
        inference_results = self.ort_session.run(None, {self.input_name: img_input})
        scores = [np.squeeze(x) for x in inference_results[:3]]
        raw_boxes = [np.squeeze(x) for x in inference_results[3:]]
        return scores, raw_boxes

    def detect(self, img):
        """img: BGR uint8. Returns (int32 boxes [N, 4], labels, scores)."""
        raw_shape = img.shape
        img_input, ResizeM = self.preprocess(img)
        scores, raw_boxes = self.infer_image(img_input)
        if scores[0].ndim == 1:
            scores = [x[:, None] for x in scores]
        return self.postprocess(scores, raw_boxes, ResizeM, raw_shape)


# ----------------------------------------------------------------------------- face_utils.py

def get_warp_mat_bbox(face_bbox, base_angle, dst_size=128, expand_ratio=0.15, aug_angle=0.0, aug_scale=1.0):
    face_x_min, face_y_min, face_x_max, face_y_max = face_bbox
    face_x_center = (face_x_min + face_x_max) / 2
    face_y_center = (face_y_min + face_y_max) / 2
    face_width = face_x_max - face_x_min
    face_height = face_y_max - face_y_min
    scale = dst_size / max(face_width, face_height) * (1 - expand_ratio) * aug_scale
    M = cv2.getRotationMatrix2D((face_x_center, face_y_center), angle=base_angle + aug_angle, scale=scale)
    offset = [dst_size / 2 - face_x_center, dst_size / 2 - face_y_center]
    M[:, 2] += offset
    return M


def transform_points(points, mat, invert=False):
    if invert:
        mat = cv2.invertAffineTransform(mat)
    points = np.expand_dims(points, axis=1)
    points = cv2.transform(points, mat, points.shape)
    points = np.squeeze(points)
    return points


def get_warp_mat_bbox_by_gt_pts_float(gt_pts, base_angle=0.0, dst_size=128, expand_ratio=0.15):
    face_x_min, face_x_max = np.min(gt_pts[:, 0]), np.max(gt_pts[:, 0])
    face_y_min, face_y_max = np.min(gt_pts[:, 1]), np.max(gt_pts[:, 1])
    face_x_center = (face_x_min + face_x_max) / 2
    face_y_center = (face_y_min + face_y_max) / 2
    M_step_1 = cv2.getRotationMatrix2D((face_x_center, face_y_center), angle=base_angle, scale=1.0)
    pts_step_1 = transform_points(gt_pts, M_step_1)
    face_x_min_step_1, face_x_max_step_1 = np.min(pts_step_1[:, 0]), np.max(pts_step_1[:, 0])
    face_y_min_step_1, face_y_max_step_1 = np.min(pts_step_1[:, 1]), np.max(pts_step_1[:, 1])
    face_width = face_x_max_step_1 - face_x_min_step_1
    face_height = face_y_max_step_1 - face_y_min_step_1
    scale = dst_size / max(face_width, face_height) * (1 - expand_ratio)
    M_step_2 = cv2.getRotationMatrix2D((face_x_center, face_y_center), angle=base_angle, scale=scale)
    pts_step_2 = transform_points(gt_pts, M_step_2)
    face_x_min_step_2, face_x_max_step_2 = np.min(pts_step_2[:, 0]), np.max(pts_step_2[:, 0])
    face_y_min_step_2, face_y_max_step_2 = np.min(pts_step_2[:, 1]), np.max(pts_step_2[:, 1])
    face_x_center_step_2 = (face_x_min_step_2 + face_x_max_step_2) / 2
    face_y_center_step_2 = (face_y_min_step_2 + face_y_max_step_2) / 2
    M = cv2.getRotationMatrix2D((face_x_center, face_y_center), angle=base_angle, scale=scale)
    offset = [dst_size / 2 - face_x_center_step_2, dst_size / 2 - face_y_center_step_2]
    M[:, 2] += offset
    return M


def smoothing_factor(t_e, cutoff):
    r = 2 * np.pi * cutoff * t_e
    return r / (r + 1)


def exponential_smoothing(a, x, x_prev):
    return a * x + (1 - a) * x_prev


class OneEuroFilter:
    def __init__(self, dx0=0.0, d_cutoff=1.0):
        self.d_cutoff = float(d_cutoff)
        self.dx_prev = float(dx0)

    def __call__(self, x, x_prev, fcmin=1.0, min_cutoff=1.0, beta=0.0):
        if x_prev is None:
            return x
        a_d = smoothing_factor(fcmin, self.d_cutoff)
        dx = (x - x_prev) / fcmin
        dx_hat = exponential_smoothing(a_d, dx, self.dx_prev)
        cutoff = min_cutoff + beta * abs(dx_hat)
        a = smoothing_factor(fcmin, cutoff)
        x_hat = exponential_smoothing(a, x, x_prev)
        self.dx_prev = dx_hat
        return x_hat


# ----------------------------------------------------------------------------- face_align.py

class FaceAlignment:
    def __init__(self, alignment_model_path, det_model_path):
        self.face_alignment_net_222 = create_onnx_session(alignment_model_path)
        self.onnx_input_name_222 = self.face_alignment_net_222.get_inputs()[0].name
        self.onnx_output_name_222 = [o.name for o in self.face_alignment_net_222.get_outputs()]
        self.face_image_size = 128
        self.face_detector = FaceDet(det_model_path)
        self.expand_ratio = 0.15

    def onnx_infer(self, input_uint8):
        assert input_uint8.shape[0] == input_uint8.shape[1] == self.face_image_size
        onnx_input = input_uint8.transpose((2, 0, 1)).astype(np.float32)[np.newaxis, :, :, :] / 255.0
        landmark, euler, prob = self.face_alignment_net_222.run(self.onnx_output_name_222,
                                                                {self.onnx_input_name_222: onnx_input})
        landmark = np.reshape(landmark[0], (2, -1)).transpose((1, 0)) * self.face_image_size
        left_eye_corner = landmark[74]
        right_eye_corner = landmark[96]
        radian = np.arctan2(right_eye_corner[1] - left_eye_corner[1],
                            right_eye_corner[0] - left_eye_corner[0] + 0.00000001)
        euler_rad = np.array([euler[0, 0], euler[0, 1], radian], dtype=np.float32)
        prob = prob[0]
        return landmark, euler_rad, prob

    def forward(self, src_image, face_box=None, pre_pts=None, iterations=3):
        if pre_pts is None:
            if face_box is None:
                bounding_boxes, _, score = self.face_detector.detect(src_image)
                if len(bounding_boxes) == 0:
                    return None
                bbox = np.zeros(4, dtype=np.float32)
                if len(bounding_boxes) >= 1:
                    max_area = 0.0
                    for each_bbox in bounding_boxes:
                        area = (each_bbox[2] - each_bbox[0]) * (each_bbox[3] - each_bbox[1])
                        if area > max_area:
                            bbox[:4] = each_bbox[:4]
                        max_area = area
                else:
                    bbox = bounding_boxes[0, :4]
            else:
                bbox = face_box.copy()
            M_Face = get_warp_mat_bbox(bbox, 0, self.face_image_size, expand_ratio=self.expand_ratio)
        else:
            left_eye_corner = pre_pts[74]
            right_eye_corner = pre_pts[96]
            radian = np.arctan2(right_eye_corner[1] - left_eye_corner[1],
                                right_eye_corner[0] - left_eye_corner[0] + 0.00000001)
            M_Face = get_warp_mat_bbox_by_gt_pts_float(pre_pts, np.rad2deg(radian), self.face_image_size,
                                                       expand_ratio=self.expand_ratio)
        face_input = cv2.warpAffine(src_image, M_Face, (self.face_image_size, self.face_image_size))
        landmarks, euler, prob = self.onnx_infer(face_input)
        landmarks = transform_points(landmarks, M_Face, invert=True)
        for _ in range(iterations - 1):
            M_Face = get_warp_mat_bbox_by_gt_pts_float(landmarks, np.rad2deg(euler[2]), self.face_image_size,
                                                       expand_ratio=self.expand_ratio)
            face_input = cv2.warpAffine(src_image, M_Face, (self.face_image_size, self.face_image_size))
            landmarks, euler, prob = self.onnx_infer(face_input)
            landmarks = transform_points(landmarks, M_Face, invert=True)
        return {"pt222": landmarks, "euler_rad": euler, "prob": prob, "M_Face": M_Face, "face_input": face_input}


# ----------------------------------------------------------------------------- camer.py

# Smoother222 groups: (indices, [(below, fcmin/beta at 0, fcmin/beta at the top of the band)], fast value).
# Each group: mean displacement d (relative to face_dis) < lo -> fcmin = beta = a * d / lo;
# lo <= d < 0.02 -> a + (b - a) * (d - lo) / (0.02 - lo); else fcmin = beta = b.
_SMOOTH_GROUPS = (
    ("face", list(range(0, 33)), list(range(9, 24)), 0.005, 0.05, 0.3),
    ("nose", list(range(33, 48)), None, 0.003, 0.03, 0.7),
    ("eyebrow", list(range(48, 74)), None, 0.003, 0.02, 0.5),
    ("left_eye", list(range(74, 96)), None, 0.003, 0.03, 0.7),
    ("right_eye", list(range(96, 118)), None, 0.003, 0.03, 0.7),
    ("mouth", list(range(118, 182)), None, 0.003, 0.05, 0.7),
    ("left_pupil", list(range(182, 202)), None, 0.003, 0.03, 0.7),
    ("right_pupil", list(range(202, 222)), None, 0.003, 0.03, 0.7),
)


def cult_dis(old_kpts, new_kpts):
    return np.sqrt(np.square(new_kpts[:, 0] - old_kpts[:, 0]) + np.square(new_kpts[:, 1] - old_kpts[:, 1]))


class Smoother222:
    def __init__(self):
        self.filters = {g[0]: OneEuroFilter() for g in _SMOOTH_GROUPS}
        self.prev_points = None

    def smooth(self, new_points, face_dis):
        if self.prev_points is None:
            self.prev_points = new_points.copy()
            return new_points
        dis = cult_dis(self.prev_points, new_points) / face_dis
        smooth_points = new_points.copy()
        for name, idx, measure_idx, lo, a, b in _SMOOTH_GROUPS:
            d = np.mean(dis[measure_idx if measure_idx is not None else idx])
            if d < lo:
                ratio_tmp = d / lo
                fc = a * ratio_tmp
            elif d < 0.02:
                ratio_tmp = (d - lo) / (0.02 - lo)
                fc = a + (b - a) * ratio_tmp
            else:
                fc = b
            smooth_points[idx] = self.filters[name](new_points[idx], self.prev_points[idx], fcmin=fc, beta=fc)
        self.prev_points = smooth_points
        return smooth_points


class CameraDemo:
    def __init__(self, face_alignment_module, reset=False):
        self.face_alignment_module = face_alignment_module
        self.face_prob_th = 0.0001
        self.min_face = 96
        self.face_image_size = self.face_alignment_module.face_image_size
        self.trackingFaces = []
        self.reset = reset

    def reset_track(self):
        self.trackingFaces = []

    def forward(self, src_image, reset=False, pre_rect=None):
        if self.reset or reset:
            self.trackingFaces = []
        if len(self.trackingFaces) == 0 and pre_rect is not None:
            detected_faces = [pre_rect]
        else:
            detected_faces, _, _ = self.face_alignment_module.face_detector.detect(src_image)
        for face_rect in detected_faces:
            self.trackingFaces.append({
                "face_rect": face_rect, "rotate_angle": 0.0, "pre_kpt_222": None,
                "face_dis": np.sqrt(np.square((face_rect[2] - face_rect[0]))
                                    + np.square((face_rect[3] - face_rect[1]))),
                "smoother_222": Smoother222(), "prob": 0})
        delete_idx_list = []
        for face_idx, tracking_face in enumerate(self.trackingFaces):
            if tracking_face["pre_kpt_222"] is not None:
                result_dict = self.face_alignment_module.forward(src_image, pre_pts=tracking_face["pre_kpt_222"],
                                                                 iterations=3)
            else:
                result_dict = self.face_alignment_module.forward(src_image, face_box=tracking_face["face_rect"],
                                                                 iterations=3)
            if result_dict["prob"] < self.face_prob_th:
                if face_idx not in delete_idx_list:
                    delete_idx_list.append(face_idx)
                continue
            landmarks_final = tracking_face["smoother_222"].smooth(result_dict["pt222"], tracking_face["face_dis"])
            tracking_face["pre_kpt_222"] = landmarks_final
            left_eye_corner = landmarks_final[74]
            right_eye_corner = landmarks_final[96]
            radian = np.arctan2(right_eye_corner[1] - left_eye_corner[1],
                                right_eye_corner[0] - left_eye_corner[0] + 0.00000001)
            rotate_angle = np.rad2deg(radian)
            face_x_min, face_x_max = np.min(landmarks_final[:, 0]), np.max(landmarks_final[:, 0])
            face_y_min, face_y_max = np.min(landmarks_final[:, 1]), np.max(landmarks_final[:, 1])
            face_bbox = [face_x_min, face_y_min, face_x_max, face_y_max]
            face_dis = np.linalg.norm(landmarks_final[0] - landmarks_final[32])
            if face_x_max - face_x_min < self.min_face or face_y_max - face_y_min < self.min_face:
                if face_idx not in delete_idx_list:
                    delete_idx_list.append(face_idx)
            euler_pred = result_dict["euler_rad"]
            pitch = np.rad2deg(euler_pred[0])
            yaw = np.rad2deg(euler_pred[1])
            max_euler = abs(pitch) + (abs(yaw) * 0.6)
            face_dis *= 1.0 + max_euler / 18.0
            tracking_face["face_rect"] = face_bbox
            tracking_face["rotate_angle"] = rotate_angle
            tracking_face["face_dis"] = face_dis
            tracking_face["prob"] = result_dict["prob"]
        if len(self.trackingFaces) > 1:
            for face_idx, target in enumerate(self.trackingFaces):
                if face_idx in delete_idx_list:
                    continue
                for idx, tracking_face in enumerate(self.trackingFaces):
                    if idx in delete_idx_list or face_idx == idx:
                        continue
                    if self.count_iou(target["face_rect"], tracking_face["face_rect"]) > 0.12:
                        if self.area(target["face_rect"]) - self.area(tracking_face["face_rect"]) < 0:
                            if face_idx not in delete_idx_list:
                                delete_idx_list.append(face_idx)
                        else:
                            if idx not in delete_idx_list:
                                delete_idx_list.append(idx)
        idx_offset = 0
        for delete_idx in sorted(delete_idx_list):
            self.trackingFaces.pop(delete_idx - idx_offset)
            idx_offset += 1
        return self.trackingFaces

    @staticmethod
    def count_iou(boxA, boxB):
        xA = max(boxA[0], boxB[0])
        yA = max(boxA[1], boxB[1])
        xB = min(boxA[2], boxB[2])
        yB = min(boxA[3], boxB[3])
        interArea = abs(max((xB - xA, 0)) * max((yB - yA), 0))
        if interArea == 0:
            return 0
        boxAArea = abs((boxA[2] - boxA[0]) * (boxA[3] - boxA[1]))
        boxBArea = abs((boxB[2] - boxB[0]) * (boxB[3] - boxB[1]))
        return interArea / float(boxAArea + boxBArea - interArea)

    @staticmethod
    def area(bbox):
        return (bbox[3] - bbox[1]) * (bbox[2] - bbox[0])


# ----------------------------------------------------------------------------- pdf.py

def umeyama(src, dst, estimate_scale):
    num = src.shape[0]
    dim = src.shape[1]
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_demean = src - src_mean
    dst_demean = dst - dst_mean
    A = np.dot(dst_demean.T, src_demean) / num
    d = np.ones((dim,), dtype=np.double)
    if np.linalg.det(A) < 0:
        d[dim - 1] = -1
    T = np.eye(dim + 1, dtype=np.double)
    U, S, V = np.linalg.svd(A)
    rank = np.linalg.matrix_rank(A)
    if rank == 0:
        return np.nan * T
    elif rank == dim - 1:
        if np.linalg.det(U) * np.linalg.det(V) > 0:
            T[:dim, :dim] = np.dot(U, V)
        else:
            s = d[dim - 1]
            d[dim - 1] = -1
            T[:dim, :dim] = np.dot(U, np.dot(np.diag(d), V))
            d[dim - 1] = s
    else:
        T[:dim, :dim] = np.dot(U, np.dot(np.diag(d), V.T))
    if estimate_scale:
        scale = 1.0 / src_demean.var(axis=0).sum() * np.dot(S, d)
    else:
        scale = 1.0
    T[:dim, dim] = dst_mean - scale * np.dot(T[:dim, :dim], src_mean.T)
    T[:dim, :dim] *= scale
    return T


PT5_IDX = [182, 202, 36, 149, 133]


def warp_face_pd_fgc(image, landmarks222, save_size=224):
    dst_pt5 = np.array([[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]]) * save_size
    src_pt5 = landmarks222[PT5_IDX]
    M = umeyama(src_pt5, dst_pt5, True)[0:2]
    return cv2.warpAffine(image, M, (save_size, save_size), flags=cv2.INTER_CUBIC)


def det_landmarks(face_aligner, frame_list):
    """BGR frames -> (frames kept, 222-point landmarks [F, 222, 2] of the largest face, stage-1 rects)."""
    rect_list = []
    new_frame_list = []
    assert len(frame_list) > 0
    face_aligner.reset_track()
    for frame in frame_list:
        faces = face_aligner.forward(frame)
        if len(faces) > 0:
            face = sorted(faces, key=lambda x: (x["face_rect"][2] - x["face_rect"][0])
                          * (x["face_rect"][3] - x["face_rect"][1]))[-1]
            rect_list.append(face["face_rect"])
            new_frame_list.append(frame)
    assert len(new_frame_list) > 0
    face_aligner.reset_track()
    save_frame_list = []
    save_landmark_list = []
    for frame, rect in zip(new_frame_list, rect_list):
        faces = face_aligner.forward(frame, pre_rect=rect)
        if len(faces) > 0:
            face = sorted(faces, key=lambda x: (x["face_rect"][2] - x["face_rect"][0])
                          * (x["face_rect"][3] - x["face_rect"][1]))[-1]
            save_frame_list.append(frame)
            save_landmark_list.append(face["pre_kpt_222"])
    assert len(save_frame_list) > 0
    save_landmark_list = np.stack(save_landmark_list, axis=0)
    face_aligner.reset_track()
    return save_frame_list, save_landmark_list, rect_list
