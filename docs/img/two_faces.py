"""The README's "From photos" picture: two synthetic faces pasted, rotated, onto a blurred random background.

    python docs/img/two_faces.py two-faces.jpg      # then: python -m pipeline.predict runs/demo two-faces.jpg \
                                                    #     --detect --annotate annotated/ --out faces.jsonl
"""

import sys

import numpy as np
from PIL import Image

from pipeline.sources.synthetic import draw_face_attributes, render_face

# (seed, left, top, side, degrees): seed 0 a 44-year-old neutral man, seed 1 a smiling 60-year-old woman
FACES = [(0, 50, 70, 170, 8), (1, 270, 100, 140, -6)]


def two_faces() -> Image.Image:
    noise = np.random.default_rng(7).integers(40, 200, (6, 8, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).resize((480, 360), Image.BICUBIC)  # smooth: no face-like texture
    for seed, left, top, side, degrees in FACES:
        rng = np.random.default_rng(seed)
        face = render_face(draw_face_attributes(rng), rng, side).convert("RGBA").rotate(degrees, Image.BICUBIC)
        photo.paste(face, (left, top), face)
    return photo


if __name__ == "__main__":
    two_faces().save(sys.argv[1], quality=92)
