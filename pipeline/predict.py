"""``python -m pipeline.predict``: face attributes for image files, from a trained run.

    python -m pipeline.predict runs/demo photos/ --out predictions.jsonl   # a run folder: its best_model.pt
    python -m pipeline.predict runs/demo/best_model.pt face.jpg             # JSON lines on stdout
    python -m pipeline.predict runs/demo/checkpoint_000004 a.png b.webp --device cpu
    python -m pipeline.predict runs/demo --export torchscript --export-path demo.ts
    python -m pipeline.predict runs/demo photos/ --detect --annotate annotated/ --out faces.jsonl  # every face

One JSON line per image, in input order (folders are searched recursively, sorted, image files only):

    {"path": "photos/a.jpg", "predictions": {"age": {"label": 31.4},
                                             "gender": {"label": "male",
                                                        "probabilities": {"female": 0.12, "male": 0.88}},
                                             "landmarks": {"points": {"left_eye": [70.2, 110.5], ...}}, ...}}
    {"path": "photos/broken.jpg", "error": "not a decodable image (corrupt file or unknown format)"}

With ``--detect`` (the ``align`` extra) every input is a photo: each face found in it is aligned as
``pipeline.shard --align`` aligns faces (pipeline/align.py) and gets one line, largest face first; a photo
without a face gets one line that says why; box, detector points and predicted landmarks are pixels of the photo:

    {"path": "photos/two.jpg", "face": 0, "faces": 2, "box": [312.4, 96.0, 420.9, 231.7], "score": 0.9998,
     "landmarks": {"left_eye": [340.1, 150.2], ...}, "predictions": {"age": {"label": 28.3}, ...}}
    {"path": "photos/empty.jpg", "faces": 0, "reason": "no face found"}

Exit status: 0 every image predicted (and the export checked), 1 some image failed or the exported model
does not match the eager one, 2 a checkpoint or command line that cannot be used.

An image is prepared as training prepared it. A square JPEG is what a shard stores, so it is read the way
the training and validation streams read a shard (:func:`pipeline.data.decode_image`); any other image is
first made a crop the way the shard writer makes one (:func:`pipeline.shard_writer.fit_image`: RGB,
scaled to fit the square and padded with black, keeping its aspect), at the model's input size; a
transparent image (a PNG with alpha) is first composited onto the ImageNet mean colour, as the shard readers do
(:func:`pipeline.sources.base.decode_image_bytes`). Both are then normalised by
:func:`pipeline.data.normalize_images`. Landmarks are given in pixels of the input image (pixel i centred on i).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from pipeline.align import (
    DEFAULT_MIN_FACE,
    AlignedFace,
    AlignExtraMissing,
    FaceDetector,
    MtcnnDetector,
    apply_transform,
    faces_in_photo,
    invert_transform,
    named_points,
)
from pipeline.annotate import annotate_faces
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize_images
from pipeline.inference import (
    DEVICE_CHOICES,
    CheckpointError,
    DeviceError,
    InferenceModel,
    choose_device,
    load_inference_model,
)
from pipeline.model import MultiTaskNet
from pipeline.run_summary import at_chance_warning, read_run_summary
from pipeline.schema import TaskSpec
from pipeline.shard_writer import describe_image_error, fit_image, uncrop_landmarks
from pipeline.sources.base import (
    IMAGE_SUFFIXES,
    NEUTRAL_BACKGROUND,
    decode_image_bytes,
    is_image_name,
)
from pipeline.task_losses import predict_age

EXPORT_TOLERANCE = 1e-5  # max abs difference between the exported and the eager model's outputs
EXPORT_METADATA_NAME = "facemtl.json"  # TorchScript extra file / ONNX metadata key describing inputs and outputs
ONNX_INSTALL_HINT = (
    f"--export onnx needs the packages onnx and onnxruntime, which facemtl does not depend on; install them into "
    f"this environment: {sys.executable} -m pip install onnx onnxruntime"
)


class ExportCheckError(Exception):
    """An exported model whose outputs differ from the eager model's."""


# ---------------------------------------------------------------- postprocessing (pure)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, k) head outputs -> (N, classes) probabilities, as the loss reads them.

    One column is a binary head trained with BCE-with-logits: [1 - sigmoid, sigmoid]. Two or more
    columns were trained with cross-entropy: softmax.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - positive, positive], dim=1)
    return torch.softmax(logits, dim=1)


PointMap = Callable[[list[float]], list[float]]  # x0, y0, ... in units of the network's input -> pixels of an image


def task_predictions(outputs: Mapping[str, torch.Tensor], tasks: Sequence[TaskSpec], age_scale: float,
                     landmarks_to_pixels: Sequence[PointMap] | None = None) -> list[dict[str, dict]]:
    """Per image: task -> {"label": class name, "probabilities": {class: p}}, {"label": years} for regression, or
    {"points": {name: [x, y]}} for landmarks.

    A class label is the most probable class (for a one-logit binary head: logit > 0, as validation counts
    it); a regression head's scaled output is turned back into years by :func:`pipeline.task_losses.predict_age`.
    Landmarks are pixels of each input image when ``landmarks_to_pixels`` (one map per image) is given, else units
    of the network's square input.
    """
    per_task: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        output = outputs[task.name].detach().float().cpu()
        if task.kind == "landmarks":
            rows = output.tolist()
            if landmarks_to_pixels is not None:
                rows = [to_pixels(row) for row, to_pixels in zip(rows, landmarks_to_pixels)]
            digits = 2 if landmarks_to_pixels else 4  # pixels, or units of the input side
            per_task[task.name] = [{"points": {name: [round(x, digits), round(y, digits)]
                                               for name, x, y in zip(task.points, row[0::2], row[1::2])}}
                                   for row in rows]
            continue
        if task.kind == "regression":
            per_task[task.name] = [{"label": round(float(years), 1)} for years in predict_age(output, age_scale)]
            continue
        probabilities = class_probabilities(output)
        per_task[task.name] = [
            {"label": task.classes[int(row.argmax())],
             "probabilities": {name: round(float(p), 6) for name, p in zip(task.classes, row)}}
            for row in probabilities
        ]
    count = next(iter(outputs.values())).shape[0]
    return [{task.name: per_task[task.name][index] for task in tasks} for index in range(count)]


# ---------------------------------------------------------------- images


class ImageReadError(Exception):
    """An input file that cannot be turned into a network input; the message says why."""


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, and every image file (by extension) under a folder, recursively and sorted.

    A path that does not exist is kept, so that it is reported as a failed input like any other.
    """
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(file for file in path.rglob("*") if file.is_file() and is_image_name(file.name))
        else:
            found.append(path)
    return found


def read_file_bytes(path: Path) -> bytes:
    """The file's bytes, or ImageReadError saying why not."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError("no such file") from None
    except OSError as error:
        raise ImageReadError(f"cannot read file ({error.strerror or error})") from None


def decoded_photo(data: bytes) -> Image.Image:
    """The decoded image (transparency composited as the shard readers do), or ImageReadError saying why not."""
    try:
        return decode_image_bytes(data)  # a full decode: corrupt and truncated files fail here
    except Exception as error:  # any decoder failure is a property of that one file
        raise ImageReadError(describe_image_error(error)) from None


def read_photo(path: Path) -> Image.Image:
    """The decoded photo at ``path``, or ImageReadError saying why not."""
    return decoded_photo(read_file_bytes(path))


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """uint8 CHW RGB of side ``image_size``, prepared as training prepared its images (see the module doc)."""
    data = read_file_bytes(path)
    image = decoded_photo(data)
    try:
        if image.format == "JPEG" and image.width == image.height:
            return decode_image(data, image_size)
        return pil_to_tensor(fit_image(image, image_size))
    except Exception as error:  # any decoder failure is a property of that one file
        raise ImageReadError(describe_image_error(error)) from None


# ---------------------------------------------------------------- prediction


def predict_files(model: InferenceModel, paths: Sequence[Path], batch_size: int) -> Iterator[dict[str, Any]]:
    """One record per path, in order: {"path", "predictions"} or {"path", "error"}."""
    for start in range(0, len(paths), batch_size):
        batch_paths = paths[start : start + batch_size]
        images: list[torch.Tensor] = []
        to_pixels: list[PointMap] = []
        errors: dict[int, str] = {}
        for index, path in enumerate(batch_paths):
            try:
                images.append(load_image(path, model.image_size))
                width, height = Image.open(path).size  # the header only: landmarks are given in its pixels
                to_pixels.append(functools.partial(uncrop_landmarks, width=width, height=height, size=model.image_size))
            except ImageReadError as error:
                errors[index] = str(error)
        predictions = iter(predict_images(model, torch.stack(images), to_pixels) if images else [])
        for index, path in enumerate(batch_paths):
            if index in errors:
                yield {"path": str(path), "error": errors[index]}
            else:
                yield {"path": str(path), "predictions": next(predictions)}


@torch.no_grad()
def predict_images(model: InferenceModel, images: torch.Tensor,
                   landmarks_to_pixels: Sequence[PointMap] | None = None) -> list[dict[str, dict]]:
    """Predictions for a uint8 NCHW batch, computed as validation computes them (eval mode, float32); landmarks in
    pixels of the original images when a map per image is given."""
    outputs = model.net(normalize_images(images.to(model.device)))
    return task_predictions(outputs, model.tasks, model.age_scale, landmarks_to_pixels)


def crop_units_to_photo(photo_to_crop: np.ndarray, size: int, points: list[float]) -> list[float]:
    """Points ``x0, y0, ...`` in units of an aligned crop's side -> pixels of its photo (pixel i centred on i, as
    :func:`uncrop_landmarks` gives them), by the inverse of the alignment's similarity."""
    in_crop = np.asarray(points, dtype=np.float64).reshape(-1, 2) * size  # continuous pixels of the crop
    return [float(value) - 0.5 for value in apply_transform(invert_transform(photo_to_crop), in_crop).ravel()]


def described_face(face: AlignedFace) -> dict[str, Any]:
    """The detection in an output line: box, score and the detector's 5 points, in pixels of the photo with pixel
    i centred on i, as the landmarks predicted (pipeline.align's continuous pixels, shifted by half a pixel)."""
    left, top, right, bottom = (value - 0.5 for value in face.detection.box)
    return {"box": [round(value, 2) for value in (left, top, right, bottom)],
            "score": round(float(face.detection.score), 4),
            "landmarks": named_points(face.detection.landmarks - 0.5)}


def face_label(predictions: dict[str, dict], most: int = 4) -> str:
    """A short text for an annotated photo: the first ``most`` answers that are not points, e.g. "age 31, male"."""
    answers = [f"{task} {answer['label']:.0f}" if isinstance(answer["label"], float) else str(answer["label"])
               for task, answer in predictions.items() if "label" in answer]
    return ", ".join(answers[:most]) + (", ..." if len(answers) > most else "")


def predict_photos(model: InferenceModel, paths: Sequence[Path], detector: FaceDetector, min_face: int,
                   annotate_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """Every face of every photo, in order: {"path", "face" (0 = largest), "faces", "box", "score", "landmarks",
    "predictions"}; a photo without a face: {"path", "faces": 0, "reason"}; an unreadable one: {"path", "error"}.

    Each face is warped onto the template at the model's input size as ``pipeline.shard --align`` warps it, and
    the landmarks a model predicts in the crop go back into the photo by the inverse of that warp.
    ``annotate_dir``: also write a copy of each photo with boxes, points and labels (under its path relative to
    the folder that holds all the photos).
    """
    photos_root = Path(os.path.commonpath([path.resolve().parent for path in paths])) if paths else Path()
    for path in paths:
        try:
            photo = read_photo(path)
        except ImageReadError as error:
            yield {"path": str(path), "error": str(error)}
            continue
        found = faces_in_photo(photo, detector, model.image_size, policy="all", min_face=min_face)
        if not found.faces:
            yield {"path": str(path), "faces": 0, "reason": found.no_face_reason}
            predictions = []
        else:
            crops = torch.stack([pil_to_tensor(face.crop) for face in found.faces])
            to_photo = [functools.partial(crop_units_to_photo, face.photo_to_crop, model.image_size)
                        for face in found.faces]
            predictions = predict_images(model, crops, to_photo)
            for index, (face, prediction) in enumerate(zip(found.faces, predictions)):
                yield {"path": str(path), "face": index, "faces": len(found.faces), **described_face(face),
                       "predictions": prediction}
        if annotate_dir is not None:
            annotated_path = annotate_dir / path.resolve().relative_to(photos_root)
            annotated_path.parent.mkdir(parents=True, exist_ok=True)
            annotate_faces(photo, [face.detection for face in found.faces],
                           [face_label(prediction) for prediction in predictions]).save(annotated_path)


def write_records(records: Iterator[dict[str, Any]], out: TextIO, errors: TextIO) -> tuple[int, int]:
    """Write JSON lines; report each failed file on ``errors``. Returns (records, failed)."""
    total = failed = 0
    for record in records:
        out.write(json.dumps(record) + "\n")
        total += 1
        if "error" in record:
            failed += 1
            print(f"error: {record['path']}: {record['error']}", file=errors, flush=True)
    return total, failed


def write_records_atomically(records: Iterator[dict[str, Any]], path: Path, errors: TextIO) -> tuple[int, int]:
    """As :func:`write_records`, into a temporary file renamed to ``path`` once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w") as handle:
            counts = write_records(records, handle, errors)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return counts


# ---------------------------------------------------------------- export


class TaskOutputs(nn.Module):
    """The network with a tuple of per-task head outputs (in ``task_names`` order) instead of a dict.

    Input: float32 (N, 3, S, S), RGB, ImageNet-normalised. Outputs: logits per class, a binary head's one
    logit when trained with BCE, and for regression the scaled value (years / age_scale).
    """

    def __init__(self, net: MultiTaskNet) -> None:
        super().__init__()
        self.net = net
        self.task_names = net.task_names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.net(images)
        return tuple(outputs[name] for name in self.task_names)


def export_metadata(model: InferenceModel) -> dict[str, Any]:
    """What a user of the exported file needs to prepare inputs and read outputs."""
    return {
        "input": {"shape": ["N", 3, model.image_size, model.image_size], "dtype": "float32", "channels": "RGB",
                  "normalisation": "(pixel / 255 - mean) / std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "crop": f"transparent pixels composited onto RGB {NEUTRAL_BACKGROUND}, then scaled to fit the square "
                          "and padded with black, keeping the aspect"},
        "outputs": [{"task": task.name, "kind": task.kind, "classes": list(task.classes), "points": list(task.points)}
                    for task in model.tasks],
        "landmarks": "x0, y0, x1, y1, ... in units of the input side (0 = left/top edge)",
        "age_scale": model.age_scale,
        "binary_heads": "one column: BCE logit of classes[1]; two columns: softmax logits",
    }


def check_batch(model: InferenceModel, count: int = 3) -> torch.Tensor:
    """A seeded batch of normalised random images (pixel values in the range real images have)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, 3, model.image_size, model.image_size), dtype=torch.uint8,
                           generator=generator)
    return normalize_images(pixels)


def max_abs_difference(expected: Sequence[torch.Tensor], actual: Sequence[Any]) -> float:
    if len(expected) != len(actual):
        raise ExportCheckError(f"the exported model returns {len(actual)} outputs, the eager one {len(expected)}")
    return max(float((torch.as_tensor(a).float() - e.float()).abs().max()) for e, a in zip(expected, actual))


ExportedRunner = Callable[[torch.Tensor], Sequence[Any]]  # runs the file just written on a batch


def write_torchscript(wrapper: TaskOutputs, path: Path, metadata: dict[str, Any],
                      example: torch.Tensor) -> ExportedRunner:
    """Trace (the forward has no data-dependent control flow), save with the metadata, load it back."""
    traced = torch.jit.trace(wrapper, example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={EXPORT_METADATA_NAME: json.dumps(metadata)})
    return torch.jit.load(str(path), map_location="cpu")


def onnx_available() -> bool:
    """Whether onnx and onnxruntime import (being installed is not enough: a missing dependency of theirs fails)."""
    try:
        for name in ("onnx", "onnxruntime"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def write_onnx(wrapper: TaskOutputs, path: Path, metadata: dict[str, Any], example: torch.Tensor) -> ExportedRunner:
    """The TorchScript-based exporter (``dynamo=False``: the default one needs onnxscript), batch axis
    dynamic, metadata as a model property; checked by onnx and opened in onnxruntime."""
    import onnx
    import onnxruntime

    names = list(wrapper.task_names)
    torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=["images"], output_names=names,
                      dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in names}})
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, {EXPORT_METADATA_NAME: json.dumps(metadata)})
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(names, {"images": batch.numpy()})


EXPORTERS = {"torchscript": write_torchscript, "onnx": write_onnx}


def export_model(model: InferenceModel, kind: str, path: Path) -> float:
    """Write the network as ``kind`` and check it: the written file, run on a batch of another size than the
    one it was exported with, must give the eager model's outputs. Returns the max abs difference; the file
    appears under ``path`` only when the check passed."""
    # A CPU copy: the exported file must not be tied to a GPU, and the model stays on its device to predict.
    wrapper = TaskOutputs(copy.deepcopy(model.net).cpu()).eval()
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Both exporters are deprecated in favour of torch.export, whose programs need Python to run;
            # TorchScript still loads in C++ (libtorch) and the legacy ONNX exporter needs no onnxscript.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            run_exported = EXPORTERS[kind](wrapper, temporary, export_metadata(model), check_batch(model, 2))
            batch = check_batch(model)
            difference = max_abs_difference(wrapper(batch), run_exported(batch))
        if not difference <= EXPORT_TOLERANCE:
            raise ExportCheckError(f"the {kind} model's outputs differ from the eager model's by {difference:.3g} "
                                   f"(> {EXPORT_TOLERANCE:g}); nothing was written")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return difference


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="run folder, best_model.pt, checkpoint.pt or Ray checkpoint folder")
    parser.add_argument("inputs", type=Path, nargs="*", help="image files and folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="JSON-lines output file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: the GPU when there is one")
    parser.add_argument("--export", choices=tuple(EXPORTERS),
                        help="also write the network as TorchScript or ONNX, checked against eager")
    parser.add_argument("--export-path", type=Path, help="file the export is written to (required with --export)")
    parser.add_argument("--detect", action="store_true",
                        help="inputs are photos: find every face (MTCNN, the align extra), align it and predict each")
    parser.add_argument("--min-face", type=int, default=DEFAULT_MIN_FACE,
                        help=f"with --detect: smallest face box side in px (default {DEFAULT_MIN_FACE})")
    parser.add_argument("--annotate", type=Path, metavar="DIR",
                        help="with --detect: write a copy of each photo with boxes, points and labels into DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and not args.export:
        parser.error("name at least one image file or folder (or --export)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.export and args.export_path is None:
        parser.error("--export needs --export-path FILE")
    if args.annotate and not args.detect:
        parser.error("--annotate draws the faces --detect finds: add --detect")
    if args.min_face < 0:
        parser.error("--min-face must be at least 0")
    try:
        device = choose_device(args.device)
    except DeviceError as error:
        parser.error(str(error))
    if args.export == "onnx" and not onnx_available():
        print(f"error: {ONNX_INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        model = load_inference_model(args.checkpoint, device)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model {model.describe()}", file=sys.stderr)
    warning = at_chance_warning(read_run_summary(model.run_dir), str(model.run_dir))
    if warning:
        print(warning, file=sys.stderr)
    export_status = run_export(model, args.export, args.export_path) if args.export else 0
    if not args.inputs:
        return export_status
    if args.detect:
        try:
            detector = MtcnnDetector(min_face=args.min_face, device=str(model.device))
        except AlignExtraMissing as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return (run_photo_predictions(model, args.inputs, args.out, detector, args.min_face, args.annotate)
                or export_status)
    return run_predictions(model, args.inputs, args.out, args.batch_size) or export_status


def run_export(model: InferenceModel, kind: str, path: Path) -> int:
    """Export and check; the exit status: 0 checked, 1 the check failed, 2 the file cannot be written."""
    try:
        difference = export_model(model, kind, path)
    except ExportCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot write the {kind} export to {path}: {error}", file=sys.stderr)
        return 2
    print(f"exported {kind} to {path}; reloaded and checked: max abs difference to eager {difference:.3g} "
          f"(tolerance {EXPORT_TOLERANCE:g})", file=sys.stderr)
    return 0


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Every image under ``inputs``; a folder without one is warned about."""
    paths = find_images(inputs)
    for folder in (path for path in inputs if path.is_dir()):
        if not any(folder in path.parents for path in paths):
            print(f"warning: folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
    return paths


def write_all(records: Iterator[dict[str, Any]], out: Path | None) -> tuple[int, int]:
    """JSON lines into ``out`` (atomically) or stdout; failed files reported on stderr. Returns (records, failed)."""
    if out is None:
        return write_records(records, sys.stdout, sys.stderr)
    return write_records_atomically(records, out, sys.stderr)


def run_predictions(model: InferenceModel, inputs: Sequence[Path], out: Path | None, batch_size: int) -> int:
    """Predict every image under ``inputs`` into ``out`` (or stdout); the exit status: 0 all, 1 some failed."""
    paths = image_paths(inputs)
    if not paths:
        print("error: no image file to predict", file=sys.stderr)
        return 2
    started = time.perf_counter()
    total, failed = write_all(predict_files(model, paths, batch_size), out)
    seconds = time.perf_counter() - started
    print(f"predicted {total - failed} of {total} images ({failed} failed) in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.0f} images/s) -> {out or 'stdout'}", file=sys.stderr)
    return 1 if failed else 0


def run_photo_predictions(model: InferenceModel, inputs: Sequence[Path], out: Path | None, detector: FaceDetector,
                          min_face: int, annotate_dir: Path | None) -> int:
    """``--detect``: every face of every photo under ``inputs``; the exit status: 0 every photo read (with or
    without a face), 1 some could not be read."""
    paths = image_paths(inputs)
    if not paths:
        print("error: no image file to predict", file=sys.stderr)
        return 2
    started = time.perf_counter()
    lines: list[dict[str, Any]] = []

    def counted(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            lines.append({key: record.get(key) for key in ("faces", "error")})
            yield record

    _, failed = write_all(counted(predict_photos(model, paths, detector, min_face, annotate_dir)), out)
    seconds = time.perf_counter() - started
    faces = sum(1 for line in lines if line["faces"])
    without_face = sum(1 for line in lines if line["faces"] == 0)
    annotated = f"; annotated copies in {annotate_dir}" if annotate_dir else ""
    print(f"found {faces} faces in {len(paths) - failed - without_face} of {len(paths)} photos ({without_face} "
          f"without a face, {failed} failed) in {seconds:.1f} s ({faces / max(seconds, 1e-9):.1f} faces/s) -> "
          f"{out or 'stdout'}{annotated}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
