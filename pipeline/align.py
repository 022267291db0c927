"""Faces in photos: detect every face and its 5 landmarks, warp each to a fixed 5-point template.

The same function prepares training crops (``pipeline.shard --align``) and prediction inputs
(``pipeline.predict --detect``), so a face looks the same to the network in both.

Coordinates are continuous image pixels: the origin is the top-left corner of the image and the centre of
pixel (column i, row j) is (i + 0.5, j + 0.5); Pillow's affine warp uses the same convention, so a
similarity between two sets of points is exactly the warp between the two images.

The detector is MTCNN (Zhang et al. 2016: boxes and 5 landmarks) as packaged, weights included, by
facenet-pytorch, from the optional extra ``pip install 'facemtl[align]'``; it is imported when a detector is
built, so ``import pipeline.align`` works without the extra.
See docs/align.md for the template, the detectors compared and the command-line options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

ALIGN_EXTRA_HINT = "pip install 'facemtl[align]'"

# MTCNN's 5 points, in its order; left and right as seen in the image (the subject's right eye is "left_eye").
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

# The template, as fractions of the crop side: the mean of those 5 points found by MTCNN on 1,182 UTKFace
# aligned crops (every 20th file of the release, 200x200, padded by 100 px of black; 3 had no face). An aligned
# photo is thus framed like the UTKFace crops the models are trained on, and any fixed offset in MTCNN's pixel
# convention cancels. Spread across the crops (1 std): eyes 3.2-3.4 px of 200, nose 5.4, mouth corners 5.0-6.5.
# Recomputed by test_template_is_the_mean_geometry_of_utkface_crops.
TEMPLATE_UNIT = np.array(
    [[0.3007, 0.2897], [0.6939, 0.2926], [0.4940, 0.5238], [0.3212, 0.6946], [0.6689, 0.6963]]
)

FacePolicy = Literal["largest", "all"]
FACE_POLICIES: tuple[FacePolicy, ...] = ("largest", "all")
NO_FACE_FOUND = "no face found"
SMALLEST_FACE = 20  # px: faces smaller than this are not sought (MTCNN's default; each halving costs ~4x time)
DEFAULT_MIN_FACE = 40  # px: the command lines' default; a 40 px face is already upscaled 3x into a 128 px crop


class AlignExtraMissing(ImportError):
    """Face detection was asked for but the ``align`` extra is not installed."""


@dataclass(frozen=True)
class AlignSettings:
    """Which faces of a photo become crops: ``policy`` (the largest, or all largest first) among those whose box
    side is at least ``min_face`` px."""

    policy: FacePolicy = "largest"
    min_face: int = DEFAULT_MIN_FACE

    def __post_init__(self) -> None:
        if self.policy not in FACE_POLICIES:
            raise ValueError(f"--faces {self.policy!r}: expected one of {', '.join(FACE_POLICIES)}")
        if self.min_face < 0:
            raise ValueError(f"--min-face must be at least 0 px, got {self.min_face}")


@dataclass(frozen=True)
class DetectedFace:
    """One face in a photo: ``box`` (left, top, right, bottom), ``landmarks`` (5, 2) in LANDMARK_NAMES order,
    both in the photo's continuous pixels, and the detector's ``score`` (higher is surer; scale per detector)."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def side(self) -> float:
        """The shorter side of the box in pixels: what ``min_face`` is compared with."""
        left, top, right, bottom = self.box
        return min(right - left, bottom - top)


@dataclass(frozen=True)
class AlignedFace:
    """A detected face warped to the template: ``crop`` (RGB, size x size), its landmarks in the crop and the
    2x3 ``photo_to_crop`` similarity (to carry a dataset's own point labels into the crop)."""

    detection: DetectedFace
    crop: Image.Image
    landmarks_in_crop: np.ndarray
    photo_to_crop: np.ndarray

    def describe(self) -> dict[str, Any]:
        """JSON-ready: box, landmarks (photo pixels) and landmarks_in_crop by LANDMARK_NAMES, score; 0.01 px."""
        return {
            "box": [round(float(value), 2) for value in self.detection.box],
            "landmarks": named_points(self.detection.landmarks),
            "landmarks_in_crop": named_points(self.landmarks_in_crop),
            "score": round(float(self.detection.score), 4),
        }


def named_points(points: np.ndarray) -> dict[str, list[float]]:
    """{"left_eye": [x, y], ...} rounded to 0.01 px, as pipeline.predict names landmark points."""
    return {name: [round(float(x), 2), round(float(y), 2)] for name, (x, y) in zip(LANDMARK_NAMES, points)}


@dataclass(frozen=True)
class FacesInPhoto:
    """What a photo gave: the aligned faces kept by the policy, or none and the reason (for rejected.parquet)."""

    faces: list[AlignedFace]
    no_face_reason: str | None = None


class FaceDetector(Protocol):
    """Finds faces: ``detect`` takes an RGB uint8 array (H, W, 3) and returns every face, in any order."""

    name: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]: ...


def template_points(size: int) -> np.ndarray:
    """The template's 5 points in a ``size`` x ``size`` crop (continuous pixels)."""
    return TEMPLATE_UNIT * size


def similarity_transform(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation + uniform scale + translation that maps ``source_points`` (N, 2) onto
    ``target_points`` (N, 2) with least squared error (Umeyama 1991, reflections excluded)."""
    source = np.asarray(source_points, dtype=np.float64)
    target = np.asarray(target_points, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"expected two (N, 2) point arrays with N >= 2, got {source.shape} and {target.shape}")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    source_variance = (source_centred**2).sum() / len(source)
    if source_variance == 0:
        raise ValueError("the source points all coincide: no scale can be found")
    covariance = target_centred.T @ source_centred / len(source)
    u, singular_values, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best fit would mirror the face: take the best rotation
        signs[-1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = (singular_values * signs).sum() / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) mapped by the 2x3 affine ``matrix``."""
    return np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """The 2x3 affine matrix that undoes ``matrix``."""
    linear_inverse = np.linalg.inv(matrix[:, :2])
    return np.hstack([linear_inverse, (-linear_inverse @ matrix[:, 2])[:, None]])


def warp_image(image: Image.Image, matrix: np.ndarray, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """``image`` mapped by the 2x3 ``matrix`` (source -> output pixels) onto an output of ``size`` (w, h),
    bilinear; shrinking by more than 2x first box-filters the image so that the result does not alias."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    reduce_factor = int(1 / scale) if scale < 0.5 else 1
    if reduce_factor > 1:
        image = image.reduce(reduce_factor)  # box filter; pixel i of the result covers i*f .. (i+1)*f
        matrix = np.hstack([matrix[:, :2] * reduce_factor, matrix[:, 2:]])
    inverse = invert_transform(matrix)
    return image.transform(size, Image.Transform.AFFINE, tuple(inverse.ravel()), Image.Resampling.BILINEAR,
                           fillcolor=(fill,) * len(image.getbands()))


def alignment_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 similarity from photo pixels to the ``size`` crop that best fits ``landmarks`` to the template."""
    return similarity_transform(landmarks, template_points(size))


def align_face(image: Image.Image, landmarks: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray]:
    """The ``size`` x ``size`` RGB crop in which ``landmarks`` (5, 2, photo pixels) best fit the template, and
    where they landed in it. Parts of the crop outside the photo are black, as fit_image pads."""
    matrix = alignment_matrix(landmarks, size)
    crop = warp_image(image.convert("RGB"), matrix, (size, size))
    return crop, apply_transform(matrix, landmarks)


def keep_faces(detections: Sequence[DetectedFace], policy: FacePolicy, min_face: int) -> list[DetectedFace] | str:
    """The faces ``policy`` keeps among those of at least ``min_face`` px (largest first), or why none."""
    if policy not in FACE_POLICIES:
        raise ValueError(f"face policy {policy!r}: expected one of {', '.join(FACE_POLICIES)}")
    if not detections:
        return NO_FACE_FOUND
    big_enough = sorted((face for face in detections if face.side >= min_face), key=lambda face: -face.side)
    if not big_enough:
        largest = max(face.side for face in detections)
        return f"no face of at least {min_face} px (found {len(detections)} smaller, the largest {largest:.0f} px)"
    return big_enough[:1] if policy == "largest" else big_enough


def faces_in_photo(image: Image.Image, detector: FaceDetector, size: int, policy: FacePolicy = "largest",
                   min_face: int = 0) -> FacesInPhoto:
    """Detect, filter by ``policy`` and ``min_face`` (box side in px), and align every kept face at ``size``."""
    rgb = image.convert("RGB")
    kept = keep_faces(detector.detect(np.asarray(rgb)), policy, min_face)
    if isinstance(kept, str):
        return FacesInPhoto(faces=[], no_face_reason=kept)
    faces = []
    for detection in kept:
        crop, landmarks_in_crop = align_face(rgb, detection.landmarks, size)
        faces.append(AlignedFace(detection, crop, landmarks_in_crop, alignment_matrix(detection.landmarks, size)))
    return FacesInPhoto(faces=faces)


def check_align_extra() -> None:
    """Raise AlignExtraMissing, naming the install command, unless a detector can be built."""
    _import_mtcnn()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run MTCNN on one thread: shard workers are already one process per core, and on 2 busy cores torch's
    thread pool made MTCNN 10x slower; the previous thread count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _import_mtcnn() -> Any:
    """facenet-pytorch's MTCNN class, or AlignExtraMissing naming the extra."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as error:
        raise AlignExtraMissing(f"face detection needs facenet-pytorch: {ALIGN_EXTRA_HINT} ({error})") from error
    return MTCNN


def crosses_edge(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """Whether ``box`` reaches outside a ``width`` x ``height`` image."""
    left, top, right, bottom = box
    return left < 0 or top < 0 or right > width or bottom > height


class MtcnnDetector:
    """MTCNN with facenet-pytorch's weights (shipped in its wheel; nothing is downloaded).

    A face cut by the photo's edge (a tight crop like UTKFace's) gets landmarks off by up to 20 px from MTCNN,
    whose last stage sees zeros beyond the edge (spread 15-19 px against 3-6 px on UTKFace crops): such photos
    are searched again with a black margin of half the largest cut face's side (about 4x the cost, only then).
    ``score``: MTCNN's face probability (0-1; it reports faces above 0.7).
    """

    name = "mtcnn"

    def __init__(self, min_face: int = SMALLEST_FACE, device: str = "cpu") -> None:
        mtcnn_class = _import_mtcnn()
        self._mtcnn = mtcnn_class(keep_all=True, min_face_size=max(min_face, SMALLEST_FACE), device=device)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        height, width = image.shape[:2]
        faces = self._detect_in(image)
        cut_sides = [face.side for face in faces if crosses_edge(face.box, width, height)]
        if not cut_sides:
            return faces
        margin = int(np.ceil(max(cut_sides) / 2))
        padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)))
        return [shift_face(face, -margin) for face in self._detect_in(padded)]

    def _detect_in(self, image: np.ndarray) -> list[DetectedFace]:
        boxes, scores, landmarks = self._mtcnn.detect(np.ascontiguousarray(image, dtype=np.uint8), landmarks=True)
        if boxes is None:
            return []
        return [DetectedFace(box=tuple(float(value) for value in box), landmarks=np.asarray(points, np.float64),
                             score=float(score))
                for box, score, points in zip(boxes, scores, landmarks)]


def shift_face(face: DetectedFace, offset: float) -> DetectedFace:
    """``face`` with its box and landmarks moved by ``offset`` pixels along both axes."""
    return DetectedFace(box=tuple(value + offset for value in face.box), landmarks=face.landmarks + offset,
                        score=face.score)
