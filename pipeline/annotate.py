"""Annotated copies of photos for ``pipeline.predict --annotate DIR``: each face's box, its 5 landmarks and a
label (the caller's text, e.g. "age 31, female, smiling"), drawn with Pillow on a copy of the photo."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from pipeline.align import DetectedFace

BOX_COLOUR = (0, 230, 118)
POINT_COLOUR = (255, 64, 64)
LABEL_TEXT_COLOUR = (255, 255, 255)
LABEL_BACKGROUND = (0, 0, 0)


def annotate_faces(photo: Image.Image, faces: Sequence[DetectedFace], labels: Sequence[str]) -> Image.Image:
    """A copy of ``photo`` (RGB) with every face's box, landmarks and label; ``photo`` itself is not changed."""
    if len(faces) != len(labels):
        raise ValueError(f"{len(faces)} faces but {len(labels)} labels: one label per face")
    annotated = photo.convert("RGB")  # convert always copies
    draw = ImageDraw.Draw(annotated)
    # Lines and text grow with the photo so that they stay visible on large photos and do not hide small ones.
    line_width = max(1, round(max(annotated.size) / 400))
    font = ImageFont.load_default(size=max(10, round(max(annotated.size) / 45)))
    for face, label in zip(faces, labels):
        left, top, right, bottom = face.box
        draw.rectangle((left, top, right - 1, bottom - 1), outline=BOX_COLOUR, width=line_width)
        radius = line_width + 1
        for x, y in face.landmarks:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=POINT_COLOUR)
        if label:
            draw_label(draw, label, (left, top, right, bottom), font)
    return annotated


def draw_label(draw: ImageDraw.ImageDraw, label: str, box: tuple[float, float, float, float],
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """``label`` on a filled strip just above the box, or just below it when the box touches the top edge."""
    left, top, _, bottom = box
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label, font=font)
    height = text_bottom - text_top + 4
    strip_top = top - height if top >= height else bottom
    draw.rectangle((left, strip_top, left + text_right - text_left + 4, strip_top + height), fill=LABEL_BACKGROUND)
    draw.text((left + 2 - text_left, strip_top + 2 - text_top), label, fill=LABEL_TEXT_COLOUR, font=font)
