"""The aligner (pipeline/align.py) and the annotated copies (pipeline/annotate.py).

Photos are made in the test: real UTKFace crops from ../shared/data pasted, rotated, scaled and shifted, onto
larger random backgrounds, so the true place of every face is known. The real detector runs (the ``align``
extra: facenet-pytorch's MTCNN); these tests skip with the reason without the extra or the data.
Distances are in pixels of the original 200x200 UTKFace crop unless said otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from pipeline.align import (
    NO_FACE_FOUND,
    TEMPLATE_UNIT,
    AlignExtraMissing,
    DetectedFace,
    MtcnnDetector,
    align_face,
    apply_transform,
    crosses_edge,
    faces_in_photo,
    invert_transform,
    keep_faces,
    one_torch_thread,
    similarity_transform,
    template_points,
    warp_image,
)
from pipeline.annotate import annotate_faces
from tests.conftest import SHARED_DATA, requires_shared_data

ALIGN_EXTRA_INSTALLED = importlib.util.find_spec("facenet_pytorch") is not None
requires_align_extra = pytest.mark.skipif(
    not ALIGN_EXTRA_INSTALLED, reason="the align extra is not installed: pip install 'facemtl[align]'")
requires_utkface = requires_shared_data("utkface.tar")

SHARD_SIZE = 128
PHOTO_SIZE = (480, 360)
# Every 600th file of the release: 40 crops, spread over ages and the datetime-ordered capture sessions.
UTKFACE_EVERY = 600


def read_utkface_crops(every: int = UTKFACE_EVERY, limit: int | None = None) -> list[Image.Image]:
    """Every ``every``-th UTKFace crop of the shared archive, decoded (one pass over the tar, 1-8 s on a busy
    machine), or only the first ``limit`` of them (reading only the start of the tar)."""
    crops: list[Image.Image] = []
    with tarfile.open(SHARED_DATA / "utkface.tar") as archive:
        for index, member in enumerate(archive):
            if member.isfile() and index % every == 0:
                crops.append(Image.open(archive.extractfile(member)).convert("RGB"))
            if len(crops) == limit:
                break
    return crops


def random_background(rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """Smooth random colours with fine noise: no face in it, and nothing flat for the detector to lean on."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def paste_face(photo: Image.Image, crop: Image.Image, angle: float, scale: float,
               centre: tuple[float, float]) -> tuple[Image.Image, np.ndarray]:
    """``crop`` rotated by ``angle`` degrees, scaled and centred at ``centre`` on a copy of ``photo``; returns
    the photo and the 2x3 matrix from crop pixels to photo pixels."""
    radians = np.deg2rad(angle)
    linear = scale * np.array([[np.cos(radians), -np.sin(radians)], [np.sin(radians), np.cos(radians)]])
    crop_centre = np.array(crop.size) / 2
    matrix = np.hstack([linear, (np.asarray(centre) - linear @ crop_centre)[:, None]])
    warped = warp_image(crop, matrix, photo.size)
    mask = warp_image(Image.new("L", crop.size, 255), matrix, photo.size)
    return Image.composite(warped, photo, mask), matrix


def random_placement(rng: np.random.Generator, crop_side: int, photo_size: tuple[int, int] = PHOTO_SIZE
                     ) -> tuple[float, float, tuple[float, float]]:
    """Angle in [-15, 15] degrees, scale in [0.6, 1.3] and a centre that keeps the rotated crop in the photo."""
    angle, scale = rng.uniform(-15, 15), rng.uniform(0.6, 1.3)
    reach = crop_side * scale * np.sqrt(2) / 2
    centre = tuple(rng.uniform(reach, side - reach) if side > 2 * reach else side / 2 for side in photo_size)
    return angle, scale, centre


def correlation(first: Image.Image, second: Image.Image, margin: int = SHARD_SIZE // 8) -> float:
    """Pearson correlation of the pixels inside a ``margin``: the face, not the corners that a rotation fills
    from the background of the photo rather than from the margin of the crop."""
    inner = (slice(margin, -margin), slice(margin, -margin))
    return float(np.corrcoef(np.asarray(first, float)[inner].ravel(), np.asarray(second, float)[inner].ravel())[0, 1])


@pytest.fixture(scope="module")
def detector() -> Iterator[MtcnnDetector]:
    with one_torch_thread():  # as a shard worker runs it
        yield MtcnnDetector()


@pytest.fixture(scope="module")
def utkface_crops() -> list[Image.Image]:
    return read_utkface_crops()


@pytest.fixture(scope="module")
def crops_with_one_face(utkface_crops: list[Image.Image],
                        detector: MtcnnDetector) -> list[tuple[Image.Image, DetectedFace]]:
    """The first 8 crops in which the detector finds exactly one face on the crop alone (about 99% do)."""
    found = []
    for crop in utkface_crops:
        faces = detector.detect(np.asarray(crop))
        if len(faces) == 1:
            found.append((crop, faces[0]))
        if len(found) == 8:
            return found
    raise AssertionError(f"fewer than 8 of {len(utkface_crops)} UTKFace crops have one face the detector finds")


def test_similarity_transform_recovers_a_hand_computed_rotation_scale_and_shift() -> None:
    # Rotate by +90 degrees (x, y) -> (-y, x), scale by 2, shift by (3, 4): by hand
    # (0, 0) -> (3, 4), (1, 0) -> (3, 6), (0, 1) -> (1, 4).
    source = np.array([[0, 0], [1, 0], [0, 1]])
    target = np.array([[3, 4], [3, 6], [1, 4]])
    matrix = similarity_transform(source, target)
    np.testing.assert_allclose(matrix, [[0, -2, 3], [2, 0, 4]], atol=1e-12)
    np.testing.assert_allclose(apply_transform(invert_transform(matrix), target), source, atol=1e-12)


def test_similarity_transform_fits_least_squares_and_never_mirrors() -> None:
    # The two targets are both moved 1 along x from the scaled source: the best fit is the pure shift.
    np.testing.assert_allclose(similarity_transform([[0, 0], [2, 0]], [[1, 0], [3, 0]]), [[1, 0, 1], [0, 1, 0]],
                               atol=1e-12)
    # A mirrored triangle has no exact similarity; the fit is still a rotation (positive determinant).
    mirrored = similarity_transform([[0, 0], [1, 0], [0, 1]], [[0, 0], [-1, 0], [0, 1]])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform([[1, 1], [1, 1]], [[0, 0], [1, 0]])


def test_align_face_puts_a_similar_copy_of_the_template_onto_the_template() -> None:
    matrix = similarity_transform(template_points(SHARD_SIZE), template_points(SHARD_SIZE) * 2.5 + [40, 7])
    photo = Image.new("RGB", (400, 400), (90, 90, 90))
    crop, landmarks_in_crop = align_face(photo, apply_transform(matrix, template_points(SHARD_SIZE)), SHARD_SIZE)
    assert crop.size == (SHARD_SIZE, SHARD_SIZE)
    np.testing.assert_allclose(landmarks_in_crop, template_points(SHARD_SIZE), atol=1e-9)


def test_warp_image_moves_a_pixel_where_the_matrix_sends_its_centre() -> None:
    image = np.zeros((20, 20), np.uint8)
    image[5, 7] = 255  # pixel centre (7.5, 5.5) in continuous coordinates
    warped = np.asarray(warp_image(Image.fromarray(image), np.array([[2.0, 0, 3], [0, 2.0, 1]]), (60, 60)), float)
    rows, columns = np.mgrid[:60, :60]
    weights = warped / warped.sum()
    assert (weights * (columns + 0.5)).sum() == pytest.approx(2 * 7.5 + 3)
    assert (weights * (rows + 0.5)).sum() == pytest.approx(2 * 5.5 + 1)


def test_face_policy_keeps_the_largest_or_all_big_enough_and_says_why_none() -> None:
    def face(side: float) -> DetectedFace:
        return DetectedFace(box=(0, 0, side, side), landmarks=np.zeros((5, 2)), score=1.0)

    small, large = face(30), face(90)
    assert keep_faces([small, large], "largest", min_face=0) == [large]
    assert keep_faces([small, large], "all", min_face=0) == [large, small]
    assert keep_faces([small, large], "all", min_face=40) == [large]
    assert keep_faces([], "all", min_face=0) == NO_FACE_FOUND
    assert keep_faces([small], "all", min_face=40) == "no face of at least 40 px (found 1 smaller, the largest 30 px)"
    with pytest.raises(ValueError, match="largest, all"):
        keep_faces([large], "biggest", min_face=0)


def test_a_box_crosses_the_edge_when_it_reaches_outside_the_photo() -> None:
    assert not crosses_edge((0, 0, 200, 100), width=200, height=100)
    assert crosses_edge((-0.5, 10, 50, 60), width=200, height=100)
    assert crosses_edge((150, 10, 200.5, 60), width=200, height=100)


def test_detector_without_the_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # what an absent package looks like to import
    with pytest.raises(AlignExtraMissing, match=r"pip install 'facemtl\[align\]'"):
        MtcnnDetector()


@requires_align_extra
@requires_utkface
def test_pasted_utkface_crops_are_found_and_aligned_as_their_true_landmarks_align_them(
        crops_with_one_face: list[tuple[Image.Image, DetectedFace]], detector: MtcnnDetector) -> None:
    rng = np.random.default_rng(7)
    for crop, on_crop in crops_with_one_face:
        angle, scale, centre = random_placement(rng, crop.width)
        photo, crop_to_photo = paste_face(random_background(rng), crop, angle, scale, centre)
        result = faces_in_photo(photo, detector, SHARD_SIZE, policy="all")
        placement = f"pasted at {angle:.1f} degrees, scale {scale:.2f}"
        assert len(result.faces) == 1, f"{placement}: {result.no_face_reason or len(result.faces)} faces"
        face = result.faces[0]
        # Where the crop's own landmarks (found on the crop alone) lie in the photo: the truth to align to.
        true_landmarks = apply_transform(crop_to_photo, on_crop.landmarks)
        true_crop, true_in_crop = align_face(photo, true_landmarks, SHARD_SIZE)
        # MTCNN's points move by a few pixels with the resampling and the background (median 2.9 px of 200 per
        # point over 38 random pastes); the similarity fit averages 5 of them: median 1.0, at most 3.1 px of the
        # 128-px crop over those 38, 0.7-2.8 px on these 8; 4 px (3% of the side) is the tolerance.
        error = np.linalg.norm(face.landmarks_in_crop - true_in_crop, axis=1).mean()
        assert error < 4.0, f"{placement}: mean landmark error {error:.2f} px of {SHARD_SIZE}"
        # The same picture as the truth would give: correlation 0.935-0.995 on these 8, tolerance 0.9.
        assert correlation(face.crop, true_crop) > 0.9, placement


@requires_align_extra
@requires_utkface
def test_a_photo_with_two_faces_gives_two_records_largest_first(
        crops_with_one_face: list[tuple[Image.Image, DetectedFace]], detector: MtcnnDetector) -> None:
    rng = np.random.default_rng(11)
    photo, small_matrix = paste_face(random_background(rng), crops_with_one_face[0][0], 5.0, 0.7, (110, 180))
    photo, large_matrix = paste_face(photo, crops_with_one_face[1][0], -8.0, 1.1, (340, 180))
    result = faces_in_photo(photo, detector, SHARD_SIZE, policy="all")
    assert result.no_face_reason is None and len(result.faces) == 2
    for face, matrix in zip(result.faces, (large_matrix, small_matrix)):
        box_centre = np.array([(face.detection.box[0] + face.detection.box[2]) / 2,
                               (face.detection.box[1] + face.detection.box[3]) / 2])
        crop_centre_in_photo = apply_transform(matrix, [[100, 100]])[0]
        assert np.linalg.norm(box_centre - crop_centre_in_photo) < 30
        described = face.describe()
        assert set(described) == {"box", "landmarks", "landmarks_in_crop", "score"}
        assert list(described["landmarks"]) == ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
        np.testing.assert_allclose(apply_transform(face.photo_to_crop, face.detection.landmarks),
                                   face.landmarks_in_crop, atol=1e-9)
    largest = faces_in_photo(photo, detector, SHARD_SIZE, policy="largest")
    assert [face.detection.box for face in largest.faces] == [result.faces[0].detection.box]


@requires_align_extra
def test_a_blank_photo_gives_no_face_and_says_so(detector: MtcnnDetector) -> None:
    blank = faces_in_photo(Image.new("RGB", PHOTO_SIZE, (128, 128, 128)), detector, SHARD_SIZE)
    assert blank.faces == [] and blank.no_face_reason == NO_FACE_FOUND
    noise = faces_in_photo(random_background(np.random.default_rng(3)), detector, SHARD_SIZE, policy="all")
    assert noise.faces == [] and noise.no_face_reason == NO_FACE_FOUND


@requires_align_extra
@requires_utkface
def test_template_is_the_mean_geometry_of_utkface_crops(utkface_crops: list[Image.Image],
                                                        detector: MtcnnDetector) -> None:
    # 40 crops (1/600 of the release) reproduce the template, measured on 1,182, within 3 px of 200: 3 standard
    # errors of a mean of 40 points whose spread is at most 6.5 px. A template from another detector or framing
    # is 10-20 px away. The crops are tight, so this also runs the second search with a margin.
    landmarks = []
    for crop in utkface_crops:
        faces = detector.detect(np.asarray(crop))
        if faces:
            landmarks.append(max(faces, key=lambda face: face.side).landmarks / crop.width)
    assert len(landmarks) > 0.95 * len(utkface_crops)
    np.testing.assert_allclose(np.mean(landmarks, axis=0), TEMPLATE_UNIT, atol=3 / 200)


def test_annotated_copy_marks_boxes_points_and_labels_and_keeps_the_photo() -> None:
    photo = Image.new("RGB", (200, 160), (0, 0, 0))
    face = DetectedFace(box=(40, 30, 120, 110), landmarks=template_points(80) + [40, 30], score=2.0)
    annotated = annotate_faces(photo, [face], ["age 31 · female"])
    assert photo.getextrema() == ((0, 0), (0, 0), (0, 0))
    pixels = np.asarray(annotated)
    assert pixels[30:111, 40].any() and pixels[30, 40:121].any()  # left edge and top edge of the box
    x, y = face.landmarks[4].astype(int)
    assert pixels[y, x].any()  # the nose point
    assert pixels[:30].any() or pixels[111:].any()  # the label, above or below the box
