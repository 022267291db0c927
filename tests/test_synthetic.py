"""Synthetic faces: deterministic rendering, the listing contract, label statistics, and pixels that
carry the labels they claim."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.schema import TASKS
from pipeline.sources.synthetic import (
    ANGRY,
    HAPPY,
    NEUTRAL,
    YOUNG_AGE_LIMIT,
    FaceAttributes,
    SyntheticImage,
    draw_face_attributes,
    draw_pose,
    list_synthetic,
    render_face,
)

WHITE, BLACK = 0, 1


def grey_pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).mean(axis=2)


def crop(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    """A window given as fractions of the image side."""
    side = pixels.shape[0]
    return pixels[int(rows[0] * side) : int(rows[1] * side), int(cols[0] * side) : int(cols[1] * side)]


def edge_energy(pixels: np.ndarray) -> float:
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


@pytest.fixture(scope="module")
def drawn_faces() -> list[FaceAttributes]:
    rng = np.random.default_rng(2024)
    return [draw_face_attributes(rng) for _ in range(4000)]


def test_same_synthetic_image_loads_identical_pixels_and_other_seeds_differ():
    face = FaceAttributes(age=42.0, gender=1, race=2, smile=1, emotion=HAPPY)
    image = SyntheticImage(seed=7, face=face, size=96)
    first, second = image.load().tobytes(), image.load().tobytes()
    assert first == second
    assert SyntheticImage(seed=8, face=face, size=96).load().tobytes() != first


def test_synthetic_image_is_rgb_of_requested_size_and_survives_pickling():
    image = SyntheticImage(seed=3, face=FaceAttributes(5.0, 0, 4, 0, NEUTRAL), size=64)
    loaded = image.load()
    assert loaded.mode == "RGB" and loaded.size == (64, 64)
    assert pickle.loads(pickle.dumps(image)).load().tobytes() == loaded.tobytes()


def test_small_faces_with_glasses_render():
    # a 26 px child with glasses (seed 131): lenses about 3 px wide, where PIL refused a fractional corner radius
    image = SyntheticImage(seed=131, face=FaceAttributes(7.0, 0, 0, 0, NEUTRAL), size=26)
    assert draw_pose(image.face, np.random.default_rng(131), 26).look.glasses
    assert image.load().size == (26, 26)


def test_list_synthetic_lists_unique_dotless_keys_with_seeded_split_fractions():
    listing = list_synthetic(2000, ["age"], seed=5, size=64)
    keys = [record.key for record in listing.records]
    assert len(keys) == 2000 and len(set(keys)) == 2000
    assert keys[0] == "synth5_0000000" and not any("." in key for key in keys)
    assert all(record.source_id == record.key for record in listing.records)
    splits = [record.split for record in listing.records]
    assert abs(splits.count("val") / 2000 - 0.1) < 0.03
    assert abs(splits.count("test") / 2000 - 0.1) < 0.03
    assert not listing.rejections


def test_list_synthetic_labels_only_requested_tasks_and_matches_the_face():
    listing = list_synthetic(50, ["gender", "young", "emotion"], seed=1, size=64)
    for record in listing.records:
        face = record.image.face
        assert set(record.labels) == set(TASKS)
        assert record.labels["age"] is None and record.labels["race"] is None and record.labels["smile"] is None
        assert record.labels["gender"] == face.gender
        assert record.labels["young"] == face.young
        assert record.labels["emotion"] == face.emotion


def test_list_synthetic_age_label_is_float_years_of_the_face():
    record = list_synthetic(1, ["age"], seed=0).records[0]
    assert isinstance(record.labels["age"], float)
    assert record.labels["age"] == record.image.face.age


def test_list_synthetic_is_reproducible_and_seed_dependent():
    first = list_synthetic(20, list(TASKS), seed=3, size=64)
    again = list_synthetic(20, list(TASKS), seed=3, size=64)
    other = list_synthetic(20, list(TASKS), seed=4, size=64)
    assert [r.image for r in first.records] == [r.image for r in again.records]
    assert [r.image.face for r in first.records] != [r.image.face for r in other.records]


def test_list_synthetic_rejects_unknown_task_naming_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: age, gender, race, smile, young, emotion"):
        list_synthetic(10, ["age", "beard"])


def test_drawn_ages_are_plausible_and_young_follows_age(drawn_faces):
    ages = np.array([face.age for face in drawn_faces])
    assert ages.min() >= 1.0 and ages.max() <= 90.0
    assert 0.5 < np.mean((ages >= 20) & (ages <= 60)) < 0.85
    assert all(face.young == int(face.age < YOUNG_AGE_LIMIT) for face in drawn_faces)
    assert 0.3 < np.mean([face.young for face in drawn_faces]) < 0.6


def test_happy_and_smile_are_strongly_correlated(drawn_faces):
    happy_smiles = [face.smile for face in drawn_faces if face.emotion == HAPPY]
    smilers_happy = [face.emotion == HAPPY for face in drawn_faces if face.smile]
    others_smile = [face.smile for face in drawn_faces if face.emotion != HAPPY]
    assert np.mean(happy_smiles) > 0.85
    assert np.mean(smilers_happy) > 0.7
    assert np.mean(others_smile) < 0.15


def test_every_class_of_every_classification_task_occurs(drawn_faces):
    assert set(face.race for face in drawn_faces) == set(range(len(TASKS["race"].classes)))
    assert set(face.emotion for face in drawn_faces) == set(range(len(TASKS["emotion"].classes)))
    assert set(face.gender for face in drawn_faces) == {0, 1}
    assert set(face.smile for face in drawn_faces) == {0, 1}


def test_white_faces_are_brighter_than_black_faces_with_the_same_nuisance():
    white, black = [], []
    for seed in range(100):
        for race, brightness in ((WHITE, white), (BLACK, black)):
            face = FaceAttributes(age=30.0, gender=seed % 2, race=race, smile=0, emotion=NEUTRAL)
            pixels = grey_pixels(render_face(face, np.random.default_rng(seed), 96))
            brightness.append(crop(pixels, (0.5, 0.6), (0.4, 0.6)).mean())
    difference = np.array(white) - np.array(black)
    assert np.all(difference > 0)
    assert difference.mean() > 60


def test_older_faces_show_more_wrinkle_edges_than_younger_twins():
    """Same seed (same pose, light, noise), age 25 vs 75: the band below the eyes gains folds and bags."""
    young, old = [], []
    for seed in range(100):
        for age, energies in ((25.0, young), (75.0, old)):
            face = FaceAttributes(age=age, gender=seed % 2, race=seed % 5, smile=0, emotion=NEUTRAL)
            pixels = grey_pixels(render_face(face, np.random.default_rng(seed), 96))
            energies.append(edge_energy(crop(pixels, (0.5, 0.6), (0.38, 0.62))))
    assert np.mean(np.array(old) > np.array(young)) > 0.85
    assert np.mean(old) > 1.15 * np.mean(young)


def test_changing_a_label_keeps_the_seeded_background_and_noise():
    """The nuisance draws do not depend on the labels, so the image corner is pixel-identical."""
    seed = 11
    smiling = render_face(FaceAttributes(30.0, 0, 3, 1, HAPPY), np.random.default_rng(seed), 96)
    frowning = render_face(FaceAttributes(30.0, 0, 3, 0, ANGRY), np.random.default_rng(seed), 96)
    corner = (0.0, 0.08)
    assert np.array_equal(crop(grey_pixels(smiling), corner, corner), crop(grey_pixels(frowning), corner, corner))
    assert not np.array_equal(grey_pixels(smiling), grey_pixels(frowning))
