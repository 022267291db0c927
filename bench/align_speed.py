"""Face detectors that ship their weights in a PyPI package, compared on one core: faces/s and faces found.

The photos are made as in tests/test_align.py: real UTKFace crops (../shared/data) rotated by up to
``--max-angle`` degrees, scaled by 0.5-1.5 and pasted at a random place on 640x480 random backgrounds, one
face each. A face counts as found when a detection's box centre lies within a quarter of the pasted crop's
side of the crop's centre; any other detection counts as a false one.

    python bench/align_speed.py [--photos 60] [--candidates mtcnn,mtcnn-40,dlib-hog,dlib-hog-x2,dlib-cnn]

Candidates: ``mtcnn`` is pipeline.align's detector (the align extra, facenet-pytorch) seeking faces from 20 px,
``mtcnn-40`` the same from 40 px (as ``dlib-hog``). The dlib ones need
``pip install dlib-bin face-recognition-models`` (wheels; the weights come as a 100 MB sdist): ``dlib-hog``
(HOG, photo doubled once: faces from 40 px), ``dlib-hog-x2`` (doubled twice: from 20 px) and ``dlib-cnn``
(dlib's MMOD CNN, not doubled: from 80 px), each followed by dlib's 5-point shape predictor.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.align import AlignExtraMissing, MtcnnDetector

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/align_speed.py`: the photos are made as the tests make them
    sys.path.insert(0, str(REPO))
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.test_align import paste_face, random_background, read_utkface_crops  # noqa: E402

PHOTO_SIZE = (640, 480)
# A detector here is a function from an RGB photo to box centres (N, 2); the setup cost is not timed.
BoxCentres = Callable[[Image.Image], np.ndarray]


@dataclass
class PastedPhoto:
    photo: Image.Image
    face_centre: np.ndarray
    crop_side_in_photo: float


def make_photos(count: int, max_angle: float, seed: int = 0) -> list[PastedPhoto]:
    crops = read_utkface_crops(every=97)
    rng = np.random.default_rng(seed)
    photos = []
    for index in range(count):
        crop = crops[index % len(crops)]
        angle, scale = rng.uniform(-max_angle, max_angle), rng.uniform(0.5, 1.5)
        reach = crop.width * scale * np.sqrt(2) / 2
        centre = tuple(rng.uniform(reach, side - reach) for side in PHOTO_SIZE)
        photo, _ = paste_face(random_background(rng, PHOTO_SIZE), crop, angle, scale, centre)
        photos.append(PastedPhoto(photo, np.asarray(centre), crop.width * scale))
    return photos


def box_centres(boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    corners = np.array(boxes, dtype=float).reshape(-1, 4)
    return (corners[:, :2] + corners[:, 2:]) / 2


def mtcnn_candidate(min_face: int) -> BoxCentres:
    import torch

    torch.set_num_threads(1)
    detector = MtcnnDetector(min_face=min_face)
    return lambda photo: box_centres([face.box for face in detector.detect(np.asarray(photo))])


def dlib_candidate(model: str, upsampling: int) -> BoxCentres:
    import dlib

    # face_recognition_models' __init__ needs pkg_resources (gone from new setuptools): find its folder instead
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        raise ImportError("face-recognition-models is not installed")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    hog = dlib.get_frontal_face_detector() if model == "hog" else None
    cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat")) if model == "cnn" else None

    def detect(photo: Image.Image) -> np.ndarray:
        image = np.asarray(photo)
        rectangles = list(hog(image, upsampling)) if hog else [face.rect for face in cnn(image, upsampling)]
        for rectangle in rectangles:
            predictor(image, rectangle)  # the 5 points are part of the cost of a face
        return box_centres([(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rectangles])

    return detect


CANDIDATES: dict[str, Callable[[], BoxCentres]] = {
    "mtcnn": lambda: mtcnn_candidate(20),
    "mtcnn-40": lambda: mtcnn_candidate(40),
    "dlib-hog": lambda: dlib_candidate("hog", 1),
    "dlib-hog-x2": lambda: dlib_candidate("hog", 2),
    "dlib-cnn": lambda: dlib_candidate("cnn", 0),
}


def score(detect: BoxCentres, photos: list[PastedPhoto]) -> tuple[float, int, int]:
    """CPU seconds per photo, faces found, false detections. CPU time of the process (all its threads;
    torch is set to one), not wall time: the figure per core holds on a machine that other jobs share."""
    found = false = 0
    start = time.process_time()
    centres_by_photo = [detect(pasted.photo) for pasted in photos]
    seconds = (time.process_time() - start) / len(photos)
    for pasted, centres in zip(photos, centres_by_photo):
        hits = np.linalg.norm(centres - pasted.face_centre, axis=1) < pasted.crop_side_in_photo / 4
        found += int(hits.any())
        false += int((~hits).sum())
    return seconds, found, false


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--max-angle", type=float, default=20.0)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    args = parser.parse_args()
    if not (SHARED_DATA / "utkface.tar").exists():
        sys.exit(f"error: the photos are made from {SHARED_DATA / 'utkface.tar'}, which is not there")
    photos = make_photos(args.photos, args.max_angle)
    print(f"{len(photos)} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, one pasted UTKFace crop each "
          f"(rotated up to {args.max_angle:g} degrees, scaled 0.5-1.5); CPU time")
    print(f"{'candidate':<12} {'faces/s/core':>12} {'CPU ms/photo':>12} {'found':>9} {'false':>6}")
    for name in args.candidates.split(","):
        try:
            detect = CANDIDATES[name]()
        except (AlignExtraMissing, ImportError) as error:
            print(f"{name:<12} not installed: {error}")
            continue
        seconds, found, false = score(detect, photos)
        print(f"{name:<12} {found / len(photos) / seconds:>12.1f} {seconds * 1000:>12.0f} "
              f"{found:>4}/{len(photos):<4} {false:>6}", flush=True)


if __name__ == "__main__":
    main()
