"""``pipeline.predict --detect``: every face of every photo, aligned as the shards align it, one JSON line each.

The photos are real UTKFace crops (../shared/data) pasted rotated, scaled and shifted onto random backgrounds
(tests/test_align.py). The model is a fixed-seed, untrained network saved as a best_model.pt (no training run
needed), with its landmarks head set to answer the template's points, so that where those points land in the
photo checks the inverse warp. Skipped with the reason without the ``align`` extra or the data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from pipeline.align import (
    LANDMARK_NAMES,
    TEMPLATE_UNIT,
    MtcnnDetector,
    align_face,
    apply_transform,
    faces_in_photo,
    invert_transform,
    one_torch_thread,
    template_points,
)
from pipeline.config import load_config_dict, to_dict
from pipeline.inference import InferenceModel, build_objective, load_inference_model
from pipeline.predict import main, predict_images, predict_photos
from pipeline.schema import TASKS
from tests.test_align import (
    paste_face,
    random_background,
    random_placement,
    read_utkface_crops,
    requires_align_extra,
    requires_utkface,
)

pytestmark = [requires_align_extra, requires_utkface]

IMAGE_SIZE = 64
TASK_NAMES = ("age", "gender", "race", "landmarks")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best_model.pt of a resnet18 MultiTaskNet initialised with seed 0; its landmarks head answers the template."""
    torch.manual_seed(0)
    config = load_config_dict({"data": {"image_size": IMAGE_SIZE}, "model": {"shared_dims": [32], "head_hidden": 16}})
    tasks = [TASKS[name] for name in TASK_NAMES]
    objective = build_objective(config, tasks)
    landmarks_output = objective.net.heads["landmarks"][-1]
    landmarks_output.weight.data.zero_()
    landmarks_output.bias.data.copy_(torch.tensor(TEMPLATE_UNIT.ravel(), dtype=torch.float32))
    path = tmp_path_factory.mktemp("fixed-seed") / "best_model.pt"
    torch.save({"objective": objective.state_dict(), "config": to_dict(config), "tasks": list(TASK_NAMES),
                "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> InferenceModel:
    return load_inference_model(checkpoint)


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector()


@pytest.fixture(scope="module")
def pasted(detector: MtcnnDetector) -> list[dict]:
    """Five one-face crops, each with its own points (found on the crop alone) and a photo it is pasted into."""
    rng = np.random.default_rng(21)
    found = []
    with one_torch_thread():
        for crop in read_utkface_crops(every=150, limit=8):
            faces = detector.detect(np.asarray(crop))
            if len(faces) != 1:
                continue
            photo, crop_to_photo = paste_face(random_background(rng), crop, *random_placement(rng, crop.width))
            found.append({"crop": crop, "points": faces[0].landmarks, "photo": photo, "crop_to_photo": crop_to_photo})
            if len(found) == 5:
                return found
    raise AssertionError("fewer than 5 of the first 8 sampled UTKFace crops have one face the detector finds")


@pytest.fixture(scope="module")
def predicted(model: InferenceModel, pasted: list[dict], detector: MtcnnDetector,
              tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """predict_photos' one line for each pasted photo."""
    folder = tmp_path_factory.mktemp("pasted")
    records = []
    with one_torch_thread():
        for index, face in enumerate(pasted):
            face["photo"].save(folder / f"{index}.png")
            (record,) = predict_photos(model, [folder / f"{index}.png"], detector, min_face=40)
            records.append(record)
    return records


def test_each_face_is_predicted_on_its_aligned_crop_and_answers_every_task(
        model: InferenceModel, pasted: list[dict], predicted: list[dict], detector: MtcnnDetector) -> None:
    record = predicted[0]
    assert (record["face"], record["faces"]) == (0, 1) and list(record["predictions"]) == list(TASK_NAMES)
    assert list(record["landmarks"]) == list(LANDMARK_NAMES) and len(record["box"]) == 4 and record["score"] > 0.9
    with one_torch_thread():
        (face,) = faces_in_photo(pasted[0]["photo"], detector, IMAGE_SIZE, policy="all", min_face=40).faces
    (direct,) = predict_images(model, pil_to_tensor(face.crop)[None])
    assert record["predictions"]["age"] == direct["age"] and record["predictions"]["race"] == direct["race"]
    expected = apply_transform(invert_transform(face.photo_to_crop), template_points(IMAGE_SIZE)) - 0.5
    predicted_points = [record["predictions"]["landmarks"]["points"][name] for name in LANDMARK_NAMES]
    # The head answers the template: in the photo, where the alignment's inverse puts the template.
    np.testing.assert_allclose(predicted_points, expected, atol=0.01)


def test_predictions_on_a_pasted_face_equal_those_on_the_crop_aligned_by_its_own_points(
        model: InferenceModel, pasted: list[dict], predicted: list[dict]) -> None:
    # The aligner puts a pasted face within ~1 px (of 128) of where the crop's own points put it (test_align), so
    # the network sees nearly the same picture, resampled twice more. On these 5 faces this fixed-seed model's age
    # moved by 0.1-0.4 years between the two, against 2.7 years between the 5 people: tolerance 1 year, which has
    # power. Its probabilities moved by at most 0.011, but an untrained model's probabilities hardly vary between
    # people (gender 0.015, race 0.009 apart), so the 0.02 bound and the same class only catch a broken wiring.
    for index, (face, record) in enumerate(zip(pasted, predicted)):
        own_crop, _ = align_face(face["crop"], face["points"], IMAGE_SIZE)
        (own,) = predict_images(model, pil_to_tensor(own_crop)[None])
        answers = record["predictions"]
        assert answers["age"]["label"] == pytest.approx(own["age"]["label"], abs=1.0), f"face {index}"
        for task in ("gender", "race"):
            assert answers[task]["label"] == own[task]["label"], f"face {index}, {task}"
            assert answers[task]["probabilities"] == pytest.approx(own[task]["probabilities"], abs=0.02), (
                f"face {index}, {task}")


def test_predicted_landmarks_land_on_the_pasted_face_in_photo_pixels(pasted: list[dict],
                                                                      predicted: list[dict]) -> None:
    for index, (face, record) in enumerate(zip(pasted, predicted)):
        points = np.array([record["predictions"]["landmarks"]["points"][name] for name in LANDMARK_NAMES])
        # The template is the mean face, from which one face's points stray by 3-6.5 px of 200 (1 std per axis), plus
        # MTCNN's noise: measured 1.2-4.6% of the face's side from the crop's own points through the paste; 8% is
        # the tolerance (a missing inverse or a wrong scale puts the points tens of per cent away).
        truth = apply_transform(face["crop_to_photo"], face["points"]) - 0.5
        side = face["crop"].width * np.sqrt(abs(np.linalg.det(face["crop_to_photo"][:, :2])))
        error = np.linalg.norm(points - truth, axis=1).mean() / side
        assert error < 0.08, f"face {index}: predicted points {error:.1%} of the face's side from the true ones"


def test_detect_writes_a_line_per_face_says_why_a_photo_has_none_and_annotates_copies(
        checkpoint: Path, pasted: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    two, _ = paste_face(random_background(np.random.default_rng(4)), pasted[1]["crop"], 5.0, 0.7, (110, 180))
    two, _ = paste_face(two, pasted[2]["crop"], -8.0, 1.1, (340, 180))
    two.save(photos / "two.jpg", quality=92)
    random_background(np.random.default_rng(5)).save(photos / "more" / "blank.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    out, annotated = tmp_path / "faces.jsonl", tmp_path / "annotated"
    with one_torch_thread():
        code = main([str(checkpoint), str(photos), "--detect", "--annotate", str(annotated), "--out", str(out)])
    assert code == 1  # broken.jpg could not be read; the other photos were still done
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_photo = {(Path(line["path"]).name, line.get("face")): line for line in lines}
    assert sorted(by_photo) == [("blank.png", None), ("broken.jpg", None), ("two.jpg", 0), ("two.jpg", 1)]
    assert by_photo["blank.png", None] == {"path": str(photos / "more" / "blank.png"), "faces": 0,
                                           "reason": "no face found"}
    assert "not a decodable image" in by_photo["broken.jpg", None]["error"]
    first, second = by_photo["two.jpg", 0], by_photo["two.jpg", 1]
    assert first["faces"] == second["faces"] == 2
    assert first["box"][2] - first["box"][0] > second["box"][2] - second["box"][0]  # largest first
    assert first["box"][0] > 200 > second["box"][2]  # the larger face was pasted on the right
    stderr = capsys.readouterr().err
    assert "found 2 faces in 1 of 3 photos (1 without a face, 1 failed)" in stderr
    original = np.asarray(Image.open(photos / "two.jpg").convert("RGB"), dtype=int)
    copy = np.asarray(Image.open(annotated / "two.jpg"), dtype=int)
    assert copy.shape == original.shape and (np.abs(copy - original).max(axis=2) > 60).mean() > 0.01
    assert (annotated / "more" / "blank.png").exists() and not (annotated / "broken.jpg").exists()


def test_annotate_without_detect_and_detect_without_the_extra_exit_2(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.png"
    random_background(np.random.default_rng(0)).save(photo)
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(photo), "--annotate", str(tmp_path / "annotated")])
    assert exit_info.value.code == 2 and "add --detect" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # what an absent package looks like to import
    assert main([str(checkpoint), str(photo), "--detect"]) == 2
    assert "pip install 'facemtl[align]'" in capsys.readouterr().err
