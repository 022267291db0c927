"""Landmarks end to end: into the crop (shard), with the crop and flip (augment), loss and NME by hand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.config import AugmentConfig
from pipeline.data import augment_batch, augment_batch_and_labels, label_values
from pipeline.metrics import MetricSums, chance_level, normalised_mean_errors
from pipeline.schema import get_task
from pipeline.shard_writer import crop_landmarks, uncrop_landmarks
from pipeline.sources.synthetic import face_landmarks, list_synthetic, rotated_point
from pipeline.task_losses import LANDMARK_LOSS_SCALE, masked_task_losses
from tests.shard_helpers import read_samples, shard

LANDMARKS = get_task("landmarks")
# Five marks in distinct colours (left eye, right eye, nose, left and right mouth corner).
MARK_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255))
CELEBA_ROW = (69, 109, 106, 113, 77, 142, 73, 152, 108, 154)  # 000001.jpg of list_landmarks_align_celeba.txt


def draw_marks(size: tuple[int, int], points: list[float], radius: int) -> Image.Image:
    """Grey image with a filled square of MARK_COLOURS[i] centred on pixel (x_i, y_i)."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for colour, x, y in zip(MARK_COLOURS, points[0::2], points[1::2]):
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return image


def colour_at(image: np.ndarray, unit_x: float, unit_y: float) -> np.ndarray:
    """The pixel under a point given in units of the image side (0 = left/top edge)."""
    height, width = image.shape[:2]
    return image[min(int(unit_y * height), height - 1), min(int(unit_x * width), width - 1)].astype(int)


def nearest_mark(colour: np.ndarray) -> int:
    return int(np.argmin([np.abs(colour - np.array(mark)).sum() for mark in MARK_COLOURS]))


def test_celeba_format_landmarks_sit_on_their_marks_in_the_written_crop(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    draw_marks((178, 218), list(CELEBA_ROW), radius=3).save(images / "000001.png")
    columns = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
               "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y"]
    table = tmp_path / "labels.csv"
    table.write_text("image,split," + ",".join(columns) + "\n000001.png,train," + ",".join(map(str, CELEBA_ROW)) + "\n")
    mapping = ",".join(f"{column}=landmarks:{index // 2}{'xy'[index % 2]}" for index, column in enumerate(columns))
    out = tmp_path / "out"
    assert shard("table", table, "--image-root", images, "--map", mapping, "--out", out, "--size", "64") == 0
    sample = read_samples(out)["000001"]
    crop = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    points = sample["json"]["labels"]["landmarks"]
    for index, (x, y) in enumerate(zip(points[0::2], points[1::2])):
        assert nearest_mark(colour_at(crop, x, y)) == index
    # by hand: 178x218 -> 52x64 (round(178 / 218 * 64)), padded 6 px on the left; left eye at pixel (69, 109)
    assert points[:2] == pytest.approx([(6 + 69.5 * 52 / 178) / 64, 109.5 / 218])


def test_augmenting_moves_points_with_the_crop_and_swaps_left_and_right_on_a_flip() -> None:
    size = 64
    unit_points = [0.35, 0.4, 0.65, 0.42, 0.5, 0.55, 0.38, 0.72, 0.62, 0.7]
    pixel_points = [coordinate * size - 0.5 for coordinate in unit_points]
    image = torch.from_numpy(np.array(draw_marks((size, size), pixel_points, radius=3))).permute(2, 0, 1)
    images = image.unsqueeze(0).repeat(16, 1, 1, 1)
    tasks = [get_task("age"), LANDMARKS]
    labels = torch.tensor([[30.0, *unit_points]] * 16)
    config = AugmentConfig(crop_scale=(0.6, 0.9), hflip=True, color_jitter=0.0)
    generator = torch.Generator().manual_seed(3)
    moved_images, moved_labels = augment_batch_and_labels(images, labels, tasks, config, generator)
    assert torch.equal(moved_labels[:, 0], labels[:, 0])
    assert torch.equal(moved_images, augment_batch(images, config, torch.Generator().manual_seed(3)))  # same draws
    flipped_rows = 0
    for row in range(16):
        pixels = moved_images[row].permute(1, 2, 0).numpy()
        marks = [nearest_mark(colour_at(pixels, x, y))
                 for x, y in zip(moved_labels[row, 1::2].tolist(), moved_labels[row, 2::2].tolist())]
        flipped = marks != [0, 1, 2, 3, 4]
        flipped_rows += flipped
        # after a flip the point named left_eye sits on the mark drawn as the right eye, and so on
        assert marks == (LANDMARKS.flip_order() if flipped else [0, 1, 2, 3, 4])
        left_x, right_x = moved_labels[row, 1].item(), moved_labels[row, 3].item()
        assert left_x < right_x  # left stays the image's left
    assert 0 < flipped_rows < 16


def test_augmenting_with_the_whole_image_and_no_flip_keeps_the_points() -> None:
    labels = torch.rand(4, 10)
    config = AugmentConfig(crop_scale=(1.0, 1.0), hflip=False, color_jitter=0.0)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    _, moved = augment_batch_and_labels(images, labels, [LANDMARKS], config, torch.Generator().manual_seed(0))
    # aspect 0.9-1.1 at full area clamps one side to 1 and leaves the other a little short: points move little
    assert (moved - labels).abs().max() < 0.06


def test_landmark_loss_is_l1_over_labelled_rows_and_nme_is_point_error_over_interocular_distance() -> None:
    tasks = [get_task("gender"), LANDMARKS]
    truth = [0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8]
    guess = [0.3, 0.44, 0.7, 0.4, 0.53, 0.6, 0.35, 0.8, 0.65, 0.8]  # left eye 0.04 low, nose 0.03 right
    labels = torch.tensor([[1.0, *truth], [0.0, *([0.0] * 10)]])
    mask = torch.tensor([[True, True], [True, False]])
    outputs = {"gender": torch.zeros(2, 2), "landmarks": torch.tensor([guess, [9.0] * 10])}
    losses = masked_task_losses(outputs, labels, mask, tasks)
    assert losses["landmarks"].item() == pytest.approx((0.04 + 0.03) / 10 * LANDMARK_LOSS_SCALE)
    nme = normalised_mean_errors(torch.tensor([guess]), torch.tensor([truth]), LANDMARKS)
    assert nme.item() == pytest.approx((0.04 + 0.03) / 5 / 0.4)  # mean point error / inter-ocular 0.4
    sums = MetricSums(tasks)
    sums.add_predictions(LANDMARKS, torch.tensor([guess]), torch.tensor([truth]))
    sums.add_losses({"landmarks": losses["landmarks"]}, {"landmarks": 1})
    sums.load_tensor(sums.as_tensor())  # survives the all-reduce layout
    summary = sums.summary()["landmarks"]
    assert summary["nme"] == pytest.approx(0.035) and summary["mae"] == pytest.approx(0.007)


def test_landmark_chance_is_the_nme_of_always_predicting_the_mean_training_points() -> None:
    train = [[0.3, 0.4, 0.7, 0.4] + [0.5] * 6, [0.3, 0.5, 0.7, 0.5] + [0.5] * 6]
    evaluation = [[0.3, 0.4, 0.7, 0.4] + [0.5] * 6]
    # the mean is 0.05 lower on both eyes... i.e. eyes at y 0.45: error 0.05 on 2 of 5 points, inter-ocular 0.4
    assert chance_level(LANDMARKS, train, evaluation) == pytest.approx(2 * 0.05 / 5 / 0.4)


def test_label_values_put_landmarks_in_their_columns_and_zeros_where_unlabelled() -> None:
    tasks = [get_task("age"), LANDMARKS]
    assert label_values({"age": 3.0, "landmarks": [0.5] * 10}, tasks) == ([3.0] + [0.5] * 10, [True, True])
    assert label_values({"age": None}, tasks) == ([0.0] * 11, [False, False])


def test_rotated_point_is_where_pil_moves_a_drawn_dot() -> None:
    size, x, y = 96, 30.0, 60.0
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=255)
    rotated = np.asarray(image.rotate(12, resample=Image.Resampling.BILINEAR, translate=(3, -4))).astype(float)
    rows, cols = np.nonzero(rotated)
    weights = rotated[rows, cols]
    centroid = ((cols * weights).sum() / weights.sum() + 0.5, (rows * weights).sum() / weights.sum() + 0.5)
    assert rotated_point(x, y, 12, (3, -4), size) == pytest.approx(centroid, abs=0.2)


def test_synthetic_faces_label_the_points_they_draw_eyes_apart_and_mouth_below_nose() -> None:
    listing = list_synthetic(30, ["landmarks"], seed=1, size=64)
    for record in listing.records:
        left_eye, right_eye, nose, mouth_left, mouth_right = np.array(record.labels["landmarks"]).reshape(5, 2)
        assert 6 < right_eye[0] - left_eye[0] < 40
        assert nose[1] > max(left_eye[1], right_eye[1]) - 4 and (mouth_left[1] + mouth_right[1]) / 2 > nose[1]
        assert mouth_left[0] < mouth_right[0]
    record = listing.records[0]
    assert record.labels["landmarks"] == face_landmarks(record.image.face, record.image.seed, 64)


@pytest.mark.parametrize("width, height", [(178, 218), (218, 178), (64, 64), (24, 48)])
def test_points_moved_into_the_crop_come_back_to_the_same_pixels(width: int, height: int) -> None:
    points = [0.0, 0.0, width - 1.0, height - 1.0, width / 3, height / 2]
    unit = crop_landmarks(points, width, height, 64)
    assert uncrop_landmarks(unit, width, height, 64) == pytest.approx(points, abs=1e-9)
    # a square image is only scaled: pixel centres map to (i + 0.5) / side
    if width == height:
        assert unit[:2] == pytest.approx([0.5 / width, 0.5 / height])


def test_loose_framing_spreads_the_points_far_beyond_the_tight_default_and_is_another_plan() -> None:
    def mean_shape_nme(framing: str) -> tuple[float, list]:
        listing = list_synthetic(200, ["landmarks"], seed=4, size=32, framing=framing)
        labels = [record.labels["landmarks"] for record in listing.records]
        return chance_level(get_task("landmarks"), labels, labels), listing.records

    tight, tight_records = mean_shape_nme("tight")
    loose, loose_records = mean_shape_nme("loose")
    assert loose > 2 * tight  # the mean shape is a poor guess only for loosely framed faces
    # the same faces and labels otherwise, drawn elsewhere in the frame: a shard plan must not mix the two
    assert [r.key for r in tight_records] == [r.key for r in loose_records]
    assert {r.source_id for r in tight_records}.isdisjoint(r.source_id for r in loose_records)
    record = loose_records[0]
    assert record.labels["landmarks"] == face_landmarks(record.image.face, record.image.seed, 32, "loose")
    with pytest.raises(ValueError, match="unknown framing 'wide'"):
        list_synthetic(1, ["age"], framing="wide")
