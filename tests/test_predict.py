"""python -m pipeline.predict: postprocessing by hand, then a tiny trained run predicting real files and exporting."""

from __future__ import annotations

import json
import math
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import decode_image, normalize_images
from pipeline.inference import load_inference_model
from pipeline.predict import (
    EXPORT_METADATA_NAME,
    check_batch,
    class_probabilities,
    find_images,
    load_image,
    main,
    onnx_available,
    task_predictions,
)
from pipeline.schema import TASKS
from pipeline.sources.base import NEUTRAL_BACKGROUND
from pipeline.train import main as train_main
from tests.test_train import tiny_overrides

# ---------------------------------------------------------------- postprocessing, by hand


def test_multiclass_head_gives_softmax_probabilities_and_the_most_probable_class() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0]])) + 7.0  # softmax ignores a common offset
    (prediction,) = task_predictions({"race": logits}, [TASKS["race"]], age_scale=100.0)
    assert prediction["race"]["label"] == "Others"
    expected = {"White": 1 / 20, "Black": 2 / 20, "Asian": 3 / 20, "Indian": 4 / 20, "Others": 10 / 20}
    assert prediction["race"]["probabilities"] == pytest.approx(expected, abs=1e-6)


def test_two_logit_binary_head_uses_softmax_and_one_logit_head_uses_sigmoid() -> None:
    two_logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # softmax: [1/4, 3/4] and [3/4, 1/4]
    one_logit = torch.tensor([[math.log(3.0)], [-math.log(3.0)]])  # sigmoid(ln 3) = 3/4: P(male) = 3/4, then 1/4
    for logits in (two_logits, one_logit):
        first, second = task_predictions({"gender": logits}, [TASKS["gender"]], age_scale=100.0)
        assert first["gender"] == {"label": "male",
                                   "probabilities": pytest.approx({"female": 0.25, "male": 0.75}, abs=1e-6)}
        assert second["gender"] == {"label": "female",
                                    "probabilities": pytest.approx({"female": 0.75, "male": 0.25}, abs=1e-6)}


def test_an_undecided_one_logit_head_says_the_first_class_as_validation_counts_it() -> None:
    probabilities = class_probabilities(torch.tensor([[0.0]]))
    assert probabilities.tolist() == [[0.5, 0.5]]
    (prediction,) = task_predictions({"smile": torch.tensor([[0.0]])}, [TASKS["smile"]], age_scale=100.0)
    assert prediction["smile"]["label"] == "not_smiling"  # validation: predicted = logit > 0


def test_age_head_output_is_unscaled_to_years_without_probabilities() -> None:
    scaled = torch.tensor([[0.3456], [0.02]])
    first, second = task_predictions({"age": scaled}, [TASKS["age"]], age_scale=100.0)
    assert first == {"age": {"label": 34.6}} and second == {"age": {"label": 2.0}}
    (scaled_by_50,) = task_predictions({"age": torch.tensor([[0.5]])}, [TASKS["age"]], age_scale=50.0)
    assert scaled_by_50["age"]["label"] == 25.0


# ---------------------------------------------------------------- images, without a model


def test_folders_are_searched_recursively_sorted_and_for_image_files_only(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/notes.txt", "z.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    absent = tmp_path / "absent.bmp"
    found = find_images([tmp_path, absent])
    assert found == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "sub/c.webp", tmp_path / "z.jpeg", absent]


def test_a_non_square_image_is_scaled_to_fit_and_padded_with_black_like_the_shard_writer(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 50), 255, dtype=np.uint8), mode="L").save(path)  # grey, 50 wide, 40 high
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    # 50x40 scaled to 32x26 (round(32 * 40 / 50)), centred: 3 black rows above, 3 below
    assert (image[:, :3] == 0).all() and (image[:, 29:] == 0).all()
    assert (image[:, 3:29] == 255).all()


def test_a_transparent_png_is_composited_onto_a_neutral_background_not_its_hidden_colour(tmp_path: Path) -> None:
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)  # black where transparent, as many editors store it
    pixels[:, 16:] = (200, 30, 30, 255)  # the right half opaque red
    path = tmp_path / "cutout.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32)
    assert (image[:, :, :16] == torch.tensor(NEUTRAL_BACKGROUND).view(3, 1, 1)).all()
    assert (image[:, :, 16:] == torch.tensor([200, 30, 30]).view(3, 1, 1)).all()


# ---------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("predict-runs")
    assert train_main(["--local", *tiny_overrides(synthetic_shards, runs, "r", "max_epochs=1")]) == 0
    return runs / "r"


@pytest.fixture(scope="module")
def image_folder(synthetic_shards, tmp_path_factory) -> Path:
    """Three JPEG crops straight out of a validation shard, a 50x40 PNG, a corrupt and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("images")
    shard_path = sorted(synthetic_shards["utk"].glob("val-*.tar"))[0]
    with tarfile.open(shard_path) as shard:
        jpegs = [member for member in shard.getmembers() if member.name.endswith(".jpg")][:3]
        for member in jpegs:
            (folder / "shard").mkdir(exist_ok=True)
            (folder / "shard" / member.name).write_bytes(shard.extractfile(member).read())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "corrupt.jpg").write_bytes(rng.bytes(600))
    whole = next((folder / "shard").iterdir()).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_good_image_gets_every_task_and_bad_files_are_recorded_without_stopping(
    trained_run: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "predictions.jsonl"
    absent = image_folder / "absent.jpg"
    # batches of 2: good and bad files share batches, and the last batch holds only the absent file
    assert main([str(trained_run), str(image_folder), str(absent), "--out", str(out), "--batch-size", "2"]) == 1
    records = read_records(out)
    assert [r["path"] for r in records] == [str(p) for p in find_images([image_folder, absent])]
    errors = {Path(r["path"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"corrupt.jpg", "truncated.jpg", "absent.jpg"}
    assert "truncated" in errors["truncated.jpg"] and "corrupt" in errors["corrupt.jpg"] \
        and "no such file" in errors["absent.jpg"]
    stderr = capsys.readouterr().err
    for name, reason in errors.items():
        assert f"{image_folder / name}: {reason}" in stderr
    assert "predicted 4 of 7 images (3 failed)" in stderr

    good = [r for r in records if "predictions" in r]
    assert len(good) == 4  # three shard crops and the PNG
    for record in good:
        predictions = record["predictions"]
        assert list(predictions) == ["age", "gender", "race", "smile", "young", "emotion"]
        assert set(predictions["age"]) == {"label"} and isinstance(predictions["age"]["label"], float)
        for task in ("gender", "race", "smile", "young", "emotion"):
            probabilities = predictions[task]["probabilities"]
            assert list(probabilities) == list(TASKS[task].classes)
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert predictions[task]["label"] == max(probabilities, key=probabilities.get)


def test_prediction_on_a_shard_crop_equals_the_model_on_the_training_data_path(
    trained_run: Path, image_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    crops = sorted((image_folder / "shard").iterdir())
    assert main([str(trained_run / "best_model.pt"), *map(str, crops)]) == 0  # no --out: JSON lines on stdout
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    model = load_inference_model(trained_run)
    images = torch.stack([decode_image(path.read_bytes(), model.image_size) for path in crops])  # as EvalStream decodes
    with torch.no_grad():
        outputs = model.net(normalize_images(images))  # as evaluate_split runs the model
    for index, record in enumerate(records):
        assert record["path"] == str(crops[index])
        predictions = record["predictions"]
        assert predictions["age"]["label"] == pytest.approx(float(outputs["age"][index, 0]) * model.age_scale,
                                                            abs=0.05 + 1e-6)
        for task in model.tasks[1:]:
            expected = class_probabilities(outputs[task.name][index : index + 1])[0]
            assert list(predictions[task.name]["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
            assert predictions[task.name]["label"] == task.classes[int(expected.argmax())]


def test_a_square_jpeg_is_read_exactly_as_the_training_stream_reads_a_shard_crop(image_folder: Path) -> None:
    crop = next((image_folder / "shard").iterdir())  # 32 px; the network input may be another size
    for image_size in (32, 24):
        assert torch.equal(load_image(crop, image_size), decode_image(crop.read_bytes(), image_size))


def test_a_run_folder_its_best_model_and_its_checkpoint_give_the_same_predictions(
    trained_run: Path, image_folder: Path, tmp_path: Path
) -> None:
    crop = str(next((image_folder / "shard").iterdir()))
    predictions = []
    for index, checkpoint in enumerate((trained_run, trained_run / "best_model.pt",
                                        trained_run / "checkpoint_000001" / "checkpoint.pt")):
        out = tmp_path / f"{index}.jsonl"  # one epoch: the checkpoint is the best model
        assert main([str(checkpoint), crop, "--out", str(out), "--device", "cpu"]) == 0
        predictions.append(read_records(out)[0]["predictions"])
    assert predictions[0] == predictions[1] == predictions[2]
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unusable_checkpoint_exits_2_naming_the_path(image_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # What makes a checkpoint unusable, and each message: tests/test_inference.py.
    crop = str(next((image_folder / "shard").iterdir()))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello world " * 10)  # torch.load raises KeyError for it
    assert main([str(garbage), crop]) == 2
    assert capsys.readouterr().err.startswith(f"error: {garbage}: cannot be read as a facemtl checkpoint")


def test_a_command_line_without_images_or_with_a_bad_option_exits_2(
    trained_run: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    crop = str(next((image_folder / "shard").iterdir()))
    for argv in ([str(trained_run)], [str(trained_run), crop, "--batch-size", "0"],
                 [str(trained_run), crop, "--export", "torchscript"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained_run), crop, "--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err


# ---------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_reloads_with_outputs_equal_to_the_eager_model(trained_run: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "model.ts"
    assert main([str(trained_run), "--export", "torchscript", "--export-path", str(path)]) == 0
    assert "max abs difference to eager" in capsys.readouterr().err
    extra_files = {EXPORT_METADATA_NAME: ""}
    exported = torch.jit.load(str(path), _extra_files=extra_files)
    metadata = json.loads(extra_files[EXPORT_METADATA_NAME])
    model = load_inference_model(trained_run)
    assert [output["task"] for output in metadata["outputs"]] == [task.name for task in model.tasks]
    batch = check_batch(model, count=4)
    with torch.no_grad():
        eager, scripted = model.net(batch), exported(batch)
    for index, task in enumerate(model.tasks):
        assert (scripted[index] - eager[task.name]).abs().max() <= 1e-5
    assert zipfile.is_zipfile(path) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not onnx_available(), reason="onnx and onnxruntime are not installed (not facemtl dependencies)")
def test_onnx_export_runs_in_onnxruntime_with_outputs_equal_to_the_eager_model(
    trained_run: Path, tmp_path: Path
) -> None:
    import onnxruntime

    path = tmp_path / "model.onnx"
    assert main([str(trained_run), "--export", "onnx", "--export-path", str(path)]) == 0
    model = load_inference_model(trained_run)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = check_batch(model, count=4)
    exported = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        eager = model.net(batch)
    for index, task in enumerate(model.tasks):
        assert np.abs(exported[index] - eager[task.name].numpy()).max() <= 1e-5


def test_onnx_export_without_the_onnx_packages_exits_2_saying_how_to_install(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main([str(trained_run), "--export", "onnx", "--export-path", str(tmp_path / "model.onnx")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()
