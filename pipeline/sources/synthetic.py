"""Synthetic faces: procedurally drawn portraits whose pixels encode known attribute labels.

The demo pipeline, the tests and the benchmarks need a face data set that exists everywhere, costs
nothing to download and has every task of the schema labelled. Each sample is a cartoon portrait drawn
with PIL primitives from its latent :class:`FaceAttributes`:

- age: face proportions (children: rounder head, bigger and lower eyes), forehead lines, crow's feet,
  nasolabial folds and under-eye bags that grow in number and contrast with age, grey hair, receding
  hairlines in older men; ``young`` is ``age < 36``;
- gender: face width, jaw shape and chin, hair length, brow thickness, beards and stubble, lipstick;
- race: skin tone (with spread), hair colour and texture, eye colour and eye height;
- emotion and smile: brow height and angle, eye opening, mouth curvature and opening;
- landmarks: the five points it draws (eye centres, nose tip, mouth corners), after pose and framing
  (:func:`face_landmarks`); the default ``tight`` framing moves them about a pixel at 32 px, so the mean
  shape is already a good guess: ``loose`` framing (:data:`FRAMINGS`) places and sizes faces freely enough
  for a landmark head to have something to learn;
- any other declared binary task (e.g. CelebA's 40 attribute names): a visible rule on the labels above,
  chosen by the task's name (:func:`derived_attribute`), so 40 attributes can be learned from these faces.

The attributes are correlated the way real ones are (Happy faces almost always smile, a smile makes
Happy likely, old faces are not young), so a multi-task model has something to share. Nuisance
variation (appearance details, expression intensity, pose, lighting, blur, sensor noise) comes from a
per-sample seed, so a small CNN has to learn the cues rather than read them off fixed pixels.

Only numpy and Pillow are used: rendering runs in shard worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.schema import LANDMARKS_TASK, LabelValue, get_task, known_tasks
from pipeline.sources.base import SourceListing, seeded_split, unit_interval

RGB = tuple[int, int, int]

SYNTHETIC_TASKS = ("age", "gender", "race", "smile", "young", "emotion", LANDMARKS_TASK)
YOUNG_AGE_LIMIT = 36
AGE_LIMITS = (1.0, 90.0)

RACE_PROBABILITIES = (0.42, 0.19, 0.15, 0.16, 0.08)  # White, Black, Asian, Indian, Others
EMOTION_PROBABILITIES = (0.12, 0.05, 0.11, 0.25, 0.15, 0.11, 0.21)  # Angry .. Neutral
ANGRY, DISGUST, FEAR, HAPPY, SAD, SURPRISE, NEUTRAL = range(7)
# P(smile | emotion): Happy almost always smiles, so P(Happy | smile) is high as well (about 0.85).
SMILE_PROBABILITY_BY_EMOTION = (0.02, 0.03, 0.03, 0.93, 0.02, 0.10, 0.12)

RACE_SKIN_RGB: tuple[RGB, ...] = (
    (236, 200, 178),  # White
    (112, 74, 52),  # Black
    (228, 192, 150),  # Asian
    (172, 122, 88),  # Indian
    (200, 152, 116),  # Others
)
BLOND, LIGHT_BROWN, DARK_BROWN, BLACK, RED = (206, 172, 108), (142, 100, 60), (78, 52, 34), (32, 28, 26), (152, 72, 36)
HAIR_CHOICES_BY_RACE: tuple[tuple[tuple[RGB, ...], tuple[float, ...]], ...] = (
    ((BLOND, LIGHT_BROWN, DARK_BROWN, BLACK, RED), (0.25, 0.3, 0.25, 0.12, 0.08)),
    ((BLACK, DARK_BROWN), (0.85, 0.15)),
    ((BLACK, DARK_BROWN), (0.9, 0.1)),
    ((BLACK, DARK_BROWN), (0.8, 0.2)),
    ((BLACK, DARK_BROWN, LIGHT_BROWN), (0.6, 0.3, 0.1)),
)
GREY_HAIR: RGB = (214, 212, 208)
BROWN_EYES, BLUE_EYES, GREEN_EYES = (70, 44, 28), (70, 110, 160), (80, 120, 70)
LIGHT_SKIN_EYE_COLOURS, LIGHT_SKIN_EYE_PROBABILITIES = (BROWN_EYES, BLUE_EYES, GREEN_EYES), (0.5, 0.35, 0.15)
BEARD_STYLES, BEARD_PROBABILITIES = ("none", "stubble", "moustache", "full"), (0.4, 0.3, 0.12, 0.18)
MOUTH_INSIDE: RGB = (70, 22, 28)
TEETH: RGB = (236, 232, 220)
EYE_WHITE: RGB = (240, 238, 232)
LASH: RGB = (30, 24, 22)
GLASSES_FRAME: RGB = (25, 25, 30)


@dataclass(frozen=True)
class FaceAttributes:
    """The latent labels of one synthetic face; ``young`` follows from ``age``."""

    age: float
    gender: int
    race: int
    smile: int
    emotion: int

    @property
    def young(self) -> int:
        return int(self.age < YOUNG_AGE_LIMIT)


@dataclass(frozen=True)
class SyntheticImage:
    """An :class:`~pipeline.sources.base.ImageRef` that draws its face when loaded (in a worker).

    ``seed`` drives the nuisance randomness only; the same seed, face and size give identical pixels.
    """

    seed: int
    face: FaceAttributes
    size: int = 160
    framing: str = "tight"

    def load(self) -> Image.Image:
        return render_face(self.face, np.random.default_rng(self.seed), self.size, self.framing)


def face_labels(face: FaceAttributes) -> dict[str, LabelValue]:
    """Every schema task's label for a face (age in years, the rest class indices)."""
    return {
        "age": float(face.age),
        "gender": face.gender,
        "race": face.race,
        "smile": face.smile,
        "young": face.young,
        "emotion": face.emotion,
    }


# Visible rules for declared binary attributes: (what it shows, whether a face has it).
ATTRIBUTE_RULES: tuple[tuple[str, object], ...] = (
    ("male", lambda face: face.gender == 1),
    ("smiling", lambda face: face.smile == 1),
    ("young", lambda face: face.age < YOUNG_AGE_LIMIT),
    ("aged 50 or more", lambda face: face.age >= 50),
    ("aged 25 to 50", lambda face: 25 <= face.age < 50),
    ("light skin", lambda face: face.race in (0, 2)),
    ("dark skin", lambda face: face.race in (1, 3)),
    ("happy", lambda face: face.emotion == HAPPY),
    ("negative emotion", lambda face: face.emotion in (ANGRY, DISGUST, SAD)),
    ("eyes wide open", lambda face: face.emotion in (FEAR, SURPRISE)),
    ("male over 35", lambda face: face.gender == 1 and face.age >= 35),
    ("woman under 40", lambda face: face.gender == 0 and face.age < 40),
)
# Names that mean what a rule shows (CelebA's), so their labels are the obvious ones.
RULE_BY_ATTRIBUTE = {"Male": "male", "Smiling": "smiling", "Young": "young", "Gray_Hair": "aged 50 or more",
                     "Pale_Skin": "light skin", "Mouth_Slightly_Open": "eyes wide open", "High_Cheekbones": "happy"}


def derived_attribute(face: FaceAttributes, task: str) -> int:
    """A declared binary attribute of a face: the rule its name means, else one picked by a hash of the name."""
    rules = dict(ATTRIBUTE_RULES)
    name = RULE_BY_ATTRIBUTE.get(task) or ATTRIBUTE_RULES[int(unit_interval(0, task) * len(ATTRIBUTE_RULES))][0]
    return int(bool(rules[name](face)))  # type: ignore[operator]


def draw_age(rng: np.random.Generator) -> float:
    """An age in years: a few children, most mass at 20-60, a tail of older people up to 90."""
    group = rng.choice(3, p=(0.12, 0.68, 0.20))
    if group == 0:
        years = rng.uniform(1.0, 18.0)
    elif group == 1:
        years = rng.normal(37.0, 11.0)
    else:
        years = rng.uniform(55.0, 90.0)
    return round(float(np.clip(years, *AGE_LIMITS)), 1)


def draw_face_attributes(rng: np.random.Generator) -> FaceAttributes:
    """Draw correlated attributes: emotion first, then a smile that depends on it."""
    emotion = int(rng.choice(len(EMOTION_PROBABILITIES), p=EMOTION_PROBABILITIES))
    return FaceAttributes(
        age=draw_age(rng),
        gender=int(rng.integers(2)),
        race=int(rng.choice(len(RACE_PROBABILITIES), p=RACE_PROBABILITIES)),
        smile=int(rng.random() < SMILE_PROBABILITY_BY_EMOTION[emotion]),
        emotion=emotion,
    )


# ---------------------------------------------------------------------------------------------------
# Per-sample appearance, expression and camera: everything the labels do not fix.


@dataclass(frozen=True)
class Appearance:
    """How one face looks beyond its labels; ``childness`` is 1 for toddlers and 0 from age 16."""

    skin: RGB
    lips: RGB
    hair: RGB
    brows: RGB
    eyes: RGB
    clothing: RGB
    background: RGB
    childness: float
    width_scale: float
    jaw_squareness: float
    chin_taper: float
    hair_length: float
    curly_hair: bool
    fringe: bool
    recession: float
    beard: str
    brow_thickness: float
    eye_height_scale: float
    wrinkle_count: int
    wrinkle_strength: float
    glasses: bool


def _mix(first: RGB, second: RGB, weight: float) -> RGB:
    """``first`` blended towards ``second`` by ``weight`` in [0, 1]."""
    return tuple(int(round(a + (b - a) * weight)) for a, b in zip(first, second))  # type: ignore[return-value]


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(min(255, max(0, round(c * factor))) for c in colour)  # type: ignore[return-value]


def _random_colour(rng: np.random.Generator, low: int, high: int) -> RGB:
    return tuple(int(c) for c in rng.integers(low, high, size=3))  # type: ignore[return-value]


def _draw_skin(race: int, rng: np.random.Generator) -> RGB:
    """The race's base tone, lighter or darker and slightly warmer or cooler per person."""
    brightness = rng.normal(1.0, 0.07)
    warmth = rng.normal(0.0, 0.03)
    red, green, blue = RACE_SKIN_RGB[race]
    return _shade((int(red * (1 + warmth)), green, int(blue * (1 - warmth))), brightness)


def _draw_hair_colour(face: FaceAttributes, rng: np.random.Generator) -> RGB:
    """A race-typical colour, greying from the late thirties on."""
    choices, probabilities = HAIR_CHOICES_BY_RACE[face.race]
    base = choices[int(rng.choice(len(choices), p=probabilities))]
    greyness = float(np.clip((face.age - 38.0) / 35.0 + rng.normal(0.0, 0.15), 0.0, 1.0))
    return _mix(base, GREY_HAIR, greyness)


def _draw_beard(face: FaceAttributes, rng: np.random.Generator) -> str:
    style = str(rng.choice(BEARD_STYLES, p=BEARD_PROBABILITIES))
    return style if face.gender == 1 and face.age >= 17 else "none"


def draw_appearance(face: FaceAttributes, rng: np.random.Generator) -> Appearance:
    """Appearance details drawn conditionally on the labels (hair, beard, wrinkles, colours).

    Every call makes the same draws whatever the labels, so one seed with other labels gives the same
    person in the same pose and light, changed only where the labels act (a counterfactual image).
    """
    male = face.gender == 1
    childness = float(np.clip((16.0 - face.age) / 12.0, 0.0, 1.0))
    adult = 1.0 - childness
    skin = _draw_skin(face.race, rng)
    hair = _draw_hair_colour(face, rng)
    lipstick = tuple(int(c) for c in rng.integers((150, 30, 50), (200, 60, 80)))
    wears_lipstick = rng.random() < 0.5 and not male and face.age >= 16
    long_hair_probability = 0.05 if male and childness > 0 else 0.1 if male else 0.8 - 0.35 * (face.age > 60)
    has_long_hair = rng.random() < long_hair_probability
    long_hair_length = float(rng.uniform(0.7, 2.2))
    light_eye_index = int(rng.choice(len(LIGHT_SKIN_EYE_COLOURS), p=LIGHT_SKIN_EYE_PROBABILITIES))
    recession = float(np.clip((face.age - 30.0) / 45.0 + rng.normal(0.0, 0.2), 0.0, 1.0)) if male else 0.0
    wrinkle_age = face.age + rng.normal(0.0, 5.0)
    return Appearance(
        skin=skin,
        lips=lipstick if wears_lipstick else _mix(skin, (150, 60, 60), 0.35),  # type: ignore[arg-type]
        hair=hair,
        brows=_mix(hair, LASH, 0.35),
        eyes=LIGHT_SKIN_EYE_COLOURS[light_eye_index] if face.race == 0 else BROWN_EYES,
        clothing=_random_colour(rng, 20, 230),
        background=_random_colour(rng, 30, 225),
        childness=childness,
        width_scale=float(rng.normal(1.0 if male else 0.92, 0.035)) * (1.0 + 0.08 * childness),
        jaw_squareness=float(rng.normal(2.9 if male else 2.1, 0.15)) * adult + 2.0 * childness,
        chin_taper=float(rng.normal(0.1 if male else 0.28, 0.04)) * adult + 0.1 * childness,
        hair_length=long_hair_length if has_long_hair else 0.0,
        curly_hair=rng.random() < 0.8 and face.race == 1,
        fringe=rng.random() < 0.3 and not male,
        recession=recession,
        beard=_draw_beard(face, rng),
        brow_thickness=float(rng.normal(0.065 if male else 0.042, 0.008)),
        eye_height_scale=0.72 if face.race == 2 else 1.0,
        wrinkle_count=int(np.clip(round((wrinkle_age - 24.0) / 11.0), 0, 5)),
        wrinkle_strength=float(np.clip((wrinkle_age - 20.0) / 55.0, 0.0, 1.0)),
        glasses=rng.random() < 0.06 + 0.2 * (face.age > 50),
    )


@dataclass(frozen=True)
class Expression:
    """Facial muscle settings, in face-frame units (1 = half the face height or width).

    ``brow_tilt`` > 0 pulls the inner brow ends down (anger); < 0 lifts them (sadness, fear).
    ``mouth_curve`` > 0 lifts the mouth corners; ``mouth_tilt`` lifts one corner (disgust).
    """

    brow_raise: float = 0.0
    brow_tilt: float = 0.0
    eye_open: float = 1.0
    mouth_curve: float = 0.0
    mouth_open: float = 0.0
    mouth_width: float = 0.3
    mouth_tilt: float = 0.0
    round_mouth: bool = False
    cheeks_raised: bool = False


EXPRESSION_BY_EMOTION: dict[int, Expression] = {
    ANGRY: Expression(brow_raise=-0.05, brow_tilt=0.12, eye_open=0.75, mouth_curve=-0.04, mouth_width=0.26),
    DISGUST: Expression(
        brow_raise=-0.03, brow_tilt=0.05, eye_open=0.7, mouth_curve=-0.03, mouth_tilt=0.07, mouth_width=0.27
    ),
    FEAR: Expression(
        brow_raise=0.10, brow_tilt=-0.07, eye_open=1.4, mouth_curve=-0.02, mouth_open=0.08, mouth_width=0.36
    ),
    HAPPY: Expression(eye_open=0.75, cheeks_raised=True),
    SAD: Expression(brow_raise=0.02, brow_tilt=-0.09, eye_open=0.85, mouth_curve=-0.09, mouth_width=0.28),
    SURPRISE: Expression(brow_raise=0.15, eye_open=1.45, mouth_open=0.22, mouth_width=0.14, round_mouth=True),
    NEUTRAL: Expression(),
}


def draw_expression(face: FaceAttributes, rng: np.random.Generator) -> Expression:
    """The emotion's expression at a random intensity, with the smile deciding the mouth corners."""
    typical = EXPRESSION_BY_EMOTION[face.emotion]
    intensity = rng.uniform(0.55, 1.15)
    brow_noise, tilt_noise, eye_noise, curve_noise = rng.normal(0.0, (0.015, 0.012, 0.06, 0.012))
    smile_curve = rng.uniform(0.07, 0.14)
    shows_teeth = rng.random() < 0.5
    smile_open = rng.uniform(0.06, 0.16) if shows_teeth else 0.0
    width_factor = rng.uniform(0.9, 1.1)
    tilt_side = rng.choice((-1.0, 1.0))
    mouth_open = typical.mouth_open * intensity
    smile_widening = 1.1 if face.smile and not typical.round_mouth else 1.0
    return Expression(
        brow_raise=typical.brow_raise * intensity + brow_noise,
        brow_tilt=typical.brow_tilt * intensity + tilt_noise,
        eye_open=1.0 + (typical.eye_open - 1.0) * intensity + eye_noise,
        mouth_curve=smile_curve if face.smile else typical.mouth_curve * intensity + curve_noise,
        mouth_open=max(mouth_open, smile_open) if face.smile else mouth_open,
        mouth_width=typical.mouth_width * smile_widening * width_factor,
        mouth_tilt=typical.mouth_tilt * intensity * tilt_side,
        round_mouth=typical.round_mouth,
        cheeks_raised=typical.cheeks_raised or bool(face.smile),
    )


@dataclass(frozen=True)
class Camera:
    """Pose, framing and image formation of one shot."""

    rotation_degrees: float
    shift: tuple[float, float]
    head_scale: float
    blur_radius: float
    light_direction: float
    light_strength: float
    gain: float
    colour_cast: tuple[float, float, float]
    noise_sigma: float


@dataclass(frozen=True)
class Framing:
    """How freely the head is rotated (degrees), shifted (fractions of the side) and scaled in the frame."""

    rotation_sigma: float
    rotation_limit: float
    shift_sigma: float
    shift_limit: float
    scale_range: tuple[float, float]


# tight: the demo's and the tests' faces (aligned-crop-like); loose: landmarks worth learning (chance NME
# 3x tight's; a 32 px model reached 0.52-0.65 of the mean shape's NME in 240 steps over 3 seeds)
FRAMINGS = {
    "tight": Framing(6.0, 15.0, 0.03, math.inf, (0.9, 1.08)),
    "loose": Framing(10.0, 25.0, 0.10, 0.20, (0.75, 1.2)),
}


def draw_camera(rng: np.random.Generator, framing: str = "tight") -> Camera:
    """Head rotation and shift (as ``framing`` allows), a lighting gradient, white balance, blur and sensor noise."""
    frame = FRAMINGS[framing]
    rotation = float(np.clip(rng.normal(0.0, frame.rotation_sigma), -frame.rotation_limit, frame.rotation_limit))
    shift = tuple(float(np.clip(rng.normal(0.0, frame.shift_sigma), -frame.shift_limit, frame.shift_limit))
                  for _ in range(2))
    return Camera(
        rotation_degrees=rotation,
        shift=shift,  # type: ignore[arg-type]
        head_scale=float(rng.uniform(*frame.scale_range)),
        blur_radius=float(rng.uniform(0.3, 1.0)),
        light_direction=float(rng.uniform(0.0, 2.0 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.45)),
        gain=float(rng.uniform(0.85, 1.12)),
        colour_cast=tuple(float(v) for v in rng.normal(1.0, 0.035, size=3)),  # type: ignore[arg-type]
        noise_sigma=float(rng.uniform(1.0, 6.0)),
    )


# ---------------------------------------------------------------------------------------------------
# Drawing. Features are placed in face-frame units: u runs -1..1 across the face, v -1..1 from the
# top of the head to the chin, so the same code draws any head size, width and image size.


@dataclass(frozen=True)
class FaceFrame:
    """Maps face-frame coordinates (u, v) to pixels."""

    centre_x: float
    centre_y: float
    half_width: float
    half_height: float

    def xy(self, u: float, v: float) -> tuple[float, float]:
        return (self.centre_x + u * self.half_width, self.centre_y + v * self.half_height)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        """The pixel bounding box of two corners given in either order (mirrored features flip them)."""
        return (*self.xy(min(u0, u1), min(v0, v1)), *self.xy(max(u0, u1), max(v0, v1)))

    def around(self, u: float, v: float, half_u: float, half_v: float) -> tuple[float, float, float, float]:
        """The pixel bounding box centred on (u, v) with the given half extents."""
        return self.box(u - half_u, v - half_v, u + half_u, v + half_v)

    def polygon(self, us: np.ndarray, vs: np.ndarray) -> list[tuple[float, float]]:
        return [self.xy(float(u), float(v)) for u, v in zip(us, vs)]

    def stroke(self, fraction_of_height: float) -> int:
        """A line width in pixels, at least one."""
        return max(1, round(fraction_of_height * self.half_height))


def face_outline(look: Appearance, points: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The head outline: an ellipse on top, a squarer (men) or tapering (women) jaw below."""
    angles = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    cos, sin = np.cos(angles), np.sin(angles)
    lower = sin > 0
    exponent = np.where(lower, 2.0 / look.jaw_squareness, 1.0)
    us = np.sign(cos) * np.abs(cos) ** exponent
    vs = np.sign(sin) * np.abs(sin) ** exponent
    us = us * (1.0 - look.chin_taper * np.clip(vs, 0.0, 1.0) ** 2)
    return us, vs


def _eye_level(look: Appearance) -> float:
    """Children's eyes sit lower in the face: the cranium is large for the face."""
    return -0.08 + 0.12 * look.childness


def _draw_body_and_back_hair(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance) -> None:
    draw.ellipse(frame.box(-2.3, 1.25, 2.3, 3.6), fill=look.clothing)
    if look.hair_length > 0:
        draw.rounded_rectangle(
            frame.box(-1.22, -1.1, 1.22, 0.2 + look.hair_length), radius=0.9 * frame.half_width, fill=look.hair
        )
    draw.rectangle(frame.box(-0.42, 0.6, 0.42, 1.45), fill=_shade(look.skin, 0.86))


def _hair_cap_box(look: Appearance) -> tuple[float, float, float, float]:
    if look.curly_hair:
        return (-1.18, -1.3, 1.18, 0.25)
    return (-1.08, -1.13, 1.08, 0.3)


# The upper edge of a beard, left to right: from the sideburns down the cheeks and over the upper lip.
BEARD_TOP_U = np.array([-0.8, -0.52, -0.28, 0.0, 0.28, 0.52, 0.8])
BEARD_TOP_V = np.array([0.1, 0.44, 0.38, 0.36, 0.38, 0.44, 0.1])


def _draw_head(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance) -> None:
    """Hair behind the head, ears, the face itself and (if any) the beard."""
    bald = look.recession >= 0.85
    u0, v0, u1, v1 = _hair_cap_box(look)
    draw.ellipse(frame.box(u0, -0.55 if bald else v0, u1, v1), fill=look.hair)
    ear_skin = _shade(look.skin, 0.92)
    for side in (-1, 1):
        draw.ellipse(frame.around(side * 0.9, 0.015, 0.14, 0.235), fill=ear_skin)
    us, vs = face_outline(look)
    draw.polygon(frame.polygon(us, vs), fill=look.skin)
    if look.beard in ("stubble", "full"):
        in_beard = vs > 0.0
        stubble = _mix(look.skin, _shade(look.hair, 0.5), 0.2)
        shade = _mix(look.skin, look.hair, 0.85) if look.beard == "full" else stubble
        beard_us = np.concatenate((us[in_beard], BEARD_TOP_U))
        beard_vs = np.concatenate((vs[in_beard], BEARD_TOP_V))
        draw.polygon(frame.polygon(beard_us, beard_vs), fill=shade)


def _draw_hair_top(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance, rng: np.random.Generator) -> None:
    """Hair over the forehead down to the hairline: a chord of the hair cap, receding temples for men."""
    strand_us = rng.uniform(-0.7, 0.7, size=6)
    strand_slants = rng.uniform(-0.2, 0.2, size=6)
    if look.recession >= 0.85:
        return
    u0, v0, u1, v1 = _hair_cap_box(look)
    hairline = -0.38 if look.fringe else -0.58 - 0.3 * look.recession
    centre_v, half_height = (v0 + v1) / 2, (v1 - v0) / 2
    cut = math.degrees(math.asin(float(np.clip((hairline - centre_v) / half_height, -1.0, 1.0))))
    draw.chord(frame.box(u0, v0, u1, v1), 180.0 - cut, 360.0 + cut, fill=look.hair)
    if look.recession > 0.3:
        # Receding temples (an "M" hairline), kept inside the hair cap so no skin shows above the head.
        temple_top = max(hairline - 0.3 * look.recession, -0.86)
        for side in (-1, 1):
            notch_us = side * np.array([0.22, 0.42, 0.56, 0.8])
            notch_vs = np.array([hairline + 0.04, temple_top, temple_top + 0.04, hairline + 0.2])
            draw.polygon(frame.polygon(notch_us, notch_vs), fill=look.skin)
    strand = _shade(look.hair, 0.82 if sum(look.hair) > 240 else 1.35)
    for u, slant in zip(strand_us, strand_slants):
        draw.line([frame.xy(u, -0.95), frame.xy(u + slant, hairline - 0.06)], fill=strand, width=1)


# PIL arc angles (degrees clockwise from 3 o'clock) of each side's nasolabial fold, left then right.
NASOLABIAL_ARC_DEGREES = {-1: (180, 260), 1: (280, 360)}


def _draw_wrinkles(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance, eye_v: float) -> None:
    """Forehead lines, nasolabial folds, crow's feet and under-eye bags: more and darker with age."""
    if look.wrinkle_strength <= 0:
        return
    line = _shade(look.skin, 1.0 - 0.5 * look.wrinkle_strength)
    width = frame.stroke(0.015 + 0.02 * look.wrinkle_strength)
    for index in range(look.wrinkle_count):
        v = eye_v - 0.3 - 0.075 * index
        draw.arc(frame.box(-0.48, v, 0.48, v + 0.3), 200, 340, fill=line, width=width)
    for side in (-1, 1):
        if look.wrinkle_strength > 0.2:
            start, end = NASOLABIAL_ARC_DEGREES[side]
            draw.arc(frame.around(side * 0.3, 0.47, 0.2, 0.25), start, end, fill=line, width=width)
        if look.wrinkle_strength > 0.3:
            corner_u = side * 0.66
            for slope in (-0.06, 0.0, 0.07):
                inner = frame.xy(corner_u, eye_v + slope * 0.3)
                outer = frame.xy(corner_u + side * 0.14, eye_v + slope * 1.6)
                draw.line([inner, outer], fill=line, width=width)
        if look.wrinkle_strength > 0.5:
            draw.arc(frame.around(side * 0.42, eye_v + 0.08, 0.18, 0.08), 20, 160, fill=line, width=width)


def _draw_eyes(
    draw: ImageDraw.ImageDraw,
    frame: FaceFrame,
    look: Appearance,
    mood: Expression,
    eye_v: float,
    gaze: tuple[float, float],
) -> None:
    """Whites, iris and pupil (looking along ``gaze``), the upper lid; opening follows the expression."""
    eye_scale = 1.0 + 0.3 * look.childness
    half_width = 0.19 * eye_scale
    half_height = max(0.02, 0.085 * eye_scale * look.eye_height_scale * mood.eye_open)
    iris_radius = 0.09 * eye_scale
    for side in (-1, 1):
        u = side * 0.42
        eye_box = frame.around(u, eye_v, half_width, half_height)
        draw.ellipse(eye_box, fill=EYE_WHITE)
        iris_u, iris_v = u + gaze[0] * half_width * 0.4, eye_v + gaze[1] * half_height * 0.3
        iris_half_height = min(iris_radius, half_height) * 1.4
        draw.ellipse(frame.around(iris_u, iris_v, iris_radius * 0.85, iris_half_height * 0.75), fill=look.eyes)
        pupil = iris_radius * 0.4
        draw.ellipse(frame.around(iris_u, iris_v, pupil * 0.85, pupil * 0.75), fill=LASH)
        draw.arc(eye_box, 180, 360, fill=LASH, width=frame.stroke(0.025))
        if mood.cheeks_raised:
            # Raised cheeks push the lower lid up: a smiling squint.
            cheek_box = frame.around(u, eye_v + half_height * 1.475, half_width * 1.1, half_height * 1.125)
            draw.chord(cheek_box, 180, 360, fill=look.skin)


def _draw_brows(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance, mood: Expression, eye_v: float) -> None:
    """Brows from inner to outer end; the inner end moves with the expression's tilt."""
    base_v = eye_v - 0.2 - mood.brow_raise
    width = frame.stroke(look.brow_thickness)
    for side in (-1, 1):
        inner = frame.xy(side * 0.16, base_v + mood.brow_tilt)
        middle = frame.xy(side * 0.42, base_v - 0.04 - 0.3 * mood.brow_tilt)
        outer = frame.xy(side * 0.66, base_v + 0.01)
        draw.line([inner, middle, outer], fill=look.brows, width=width, joint="curve")
    if mood.brow_tilt > 0.08:
        crease = _shade(look.skin, 0.75)
        for side in (-1, 1):
            draw.line([frame.xy(side * 0.06, base_v), frame.xy(side * 0.05, base_v + 0.14)], fill=crease, width=1)


def _draw_nose(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance, eye_v: float) -> None:
    tip_v = eye_v + 0.34 - 0.06 * look.childness
    shadow = _shade(look.skin, 0.78)
    draw.line([frame.xy(0.04, eye_v + 0.08), frame.xy(0.07, tip_v - 0.02)], fill=_shade(look.skin, 0.9), width=1)
    draw.arc(frame.box(-0.15, tip_v - 0.08, 0.15, tip_v + 0.05), 20, 160, fill=shadow, width=frame.stroke(0.02))
    for side in (-1, 1):
        draw.ellipse(frame.around(side * 0.09, tip_v, 0.035, 0.018), fill=shadow)


def _draw_mouth(draw: ImageDraw.ImageDraw, frame: FaceFrame, look: Appearance, mood: Expression, eye_v: float) -> None:
    """Lip line or open mouth; corners rise with ``mouth_curve`` and one rises with ``mouth_tilt``."""
    mouth_v = eye_v + 0.6 - 0.08 * look.childness
    half_width = mood.mouth_width * (1.0 - 0.2 * look.childness)
    if look.beard == "moustache":
        draw.chord(frame.around(0.0, mouth_v - 0.06, half_width + 0.05, 0.1), 180, 360, fill=look.hair)
    if mood.round_mouth:
        box = frame.box(-half_width, mouth_v - mood.mouth_open * 0.45, half_width, mouth_v + mood.mouth_open * 0.55)
        draw.ellipse(box, fill=MOUTH_INSIDE, outline=look.lips, width=frame.stroke(0.035))
        return
    xs = np.linspace(-1.0, 1.0, 15)
    centre_line = mouth_v - mood.mouth_curve * xs**2 - mood.mouth_tilt * xs
    bulge = 1.0 - xs**2
    us = xs * half_width
    if mood.mouth_open < 0.03:
        draw.line(frame.polygon(us, centre_line), fill=look.lips, width=frame.stroke(0.04), joint="curve")
        draw.line(frame.polygon(us, centre_line), fill=_shade(look.lips, 0.6), width=1)
        return
    upper = centre_line - 0.25 * mood.mouth_open * bulge
    lower = centre_line + mood.mouth_open * bulge
    outline = frame.polygon(np.concatenate((us, us[::-1])), np.concatenate((upper, lower[::-1])))
    draw.polygon(outline, fill=MOUTH_INSIDE)
    teeth_lower = upper + 0.45 * mood.mouth_open * bulge
    draw.polygon(frame.polygon(np.concatenate((us, us[::-1])), np.concatenate((upper, teeth_lower[::-1]))), fill=TEETH)
    draw.line(outline + outline[:1], fill=look.lips, width=frame.stroke(0.03), joint="curve")


def _draw_glasses(draw: ImageDraw.ImageDraw, frame: FaceFrame, eye_v: float) -> None:
    width = frame.stroke(0.025)
    for side in (-1, 1):
        lens = frame.around(side * 0.42, eye_v, 0.27, 0.15)
        # A whole-pixel radius: PIL (<= 13) rounds the box but not the radius, and a fractional radius on a lens a
        # few pixels wide (small images) makes it draw an edge whose end lies before its start, which it refuses.
        draw.rounded_rectangle(lens, radius=round(0.08 * frame.half_width), outline=GLASSES_FRAME, width=width)
    draw.line([frame.xy(-0.15, eye_v - 0.04), frame.xy(0.15, eye_v - 0.04)], fill=GLASSES_FRAME, width=width)


def _light_and_tint(camera: Camera, size: int) -> np.ndarray:
    """Per-pixel, per-channel gain: a linear brightness gradient across the image times the white balance."""
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    across = np.float32(camera.light_strength * math.cos(camera.light_direction)) * coordinates[None, :]
    down = np.float32(camera.light_strength * math.sin(camera.light_direction)) * coordinates[:, None]
    light = (1.0 + across + down) * np.float32(camera.gain)
    return light[:, :, None] * np.asarray(camera.colour_cast, dtype=np.float32)


def _photograph(portrait: Image.Image, camera: Camera, background: RGB, rng: np.random.Generator) -> Image.Image:
    """Rotate and shift the head, blur, light with a gradient, tint and add sensor noise."""
    size = portrait.width
    shift = (camera.shift[0] * size, camera.shift[1] * size)
    posed = portrait.rotate(
        camera.rotation_degrees, resample=Image.Resampling.BILINEAR, translate=shift, fillcolor=background
    )
    blurred = posed.filter(ImageFilter.BoxBlur(camera.blur_radius * size / 160.0))
    pixels = np.asarray(blurred, dtype=np.float32)
    pixels *= _light_and_tint(camera, size)
    # Uniform luminance noise with the camera's standard deviation: one channel broadcast to three,
    # and uniform draws are several times cheaper than Gaussian ones at no visible difference.
    uniform = rng.random((size, size, 1), dtype=np.float32) - np.float32(0.5)
    pixels += np.float32(camera.noise_sigma * math.sqrt(12.0)) * uniform
    np.clip(pixels, 0.0, 255.0, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


@dataclass(frozen=True)
class Pose:
    """What the first draws of a face's seed fix: its look, expression, camera, gaze and face frame."""

    look: Appearance
    mood: Expression
    camera: Camera
    gaze: tuple[float, float]
    frame: FaceFrame


def draw_pose(face: FaceAttributes, rng: np.random.Generator, size: int, framing: str = "tight") -> Pose:
    look = draw_appearance(face, rng)
    mood = draw_expression(face, rng)
    camera = draw_camera(rng, framing)
    gaze = (float(rng.uniform(-1.0, 1.0)), float(rng.uniform(-1.0, 1.0)))
    head_height = 0.3 * size * camera.head_scale * (1.0 - 0.06 * look.childness)
    frame = FaceFrame(size / 2, size / 2, head_height * 0.78 * look.width_scale, head_height)
    return Pose(look, mood, camera, gaze, frame)


def render_face(face: FaceAttributes, rng: np.random.Generator, size: int, framing: str = "tight") -> Image.Image:
    """Draw ``face`` as a ``size`` x ``size`` RGB portrait; ``rng`` supplies all nuisance variation."""
    pose = draw_pose(face, rng, size, framing)
    look, mood, frame = pose.look, pose.mood, pose.frame
    portrait = Image.new("RGB", (size, size), look.background)
    draw = ImageDraw.Draw(portrait)
    eye_v = _eye_level(look)
    _draw_body_and_back_hair(draw, frame, look)
    _draw_head(draw, frame, look)
    _draw_wrinkles(draw, frame, look, eye_v)
    _draw_hair_top(draw, frame, look, rng)
    _draw_nose(draw, frame, look, eye_v)
    _draw_mouth(draw, frame, look, mood, eye_v)
    _draw_eyes(draw, frame, look, mood, eye_v, pose.gaze)
    _draw_brows(draw, frame, look, mood, eye_v)
    if look.glasses:
        _draw_glasses(draw, frame, eye_v)
    return _photograph(portrait, pose.camera, look.background, rng)


def face_landmarks(face: FaceAttributes, seed: int, size: int, framing: str = "tight") -> list[float]:
    """Pixel indices ``x, y`` (as CelebA's: pixel i is centred on i) of the points :func:`render_face` draws
    with ``seed``: left eye, right eye (centres; left = the image's left), nose tip, left and right mouth
    corner, after the head's rotation and shift."""
    pose = draw_pose(face, np.random.default_rng(seed), size, framing)
    look, mood = pose.look, pose.mood
    eye_v = _eye_level(look)
    tip_v = eye_v + 0.34 - 0.06 * look.childness
    mouth_v = eye_v + 0.6 - 0.08 * look.childness
    half_width = mood.mouth_width * (1.0 - 0.2 * look.childness)
    if mood.round_mouth:
        corner_vs = (mouth_v + 0.05 * mood.mouth_open,) * 2
    else:  # the centre line of _draw_mouth at xs = -1 and +1
        corner_vs = (mouth_v - mood.mouth_curve + mood.mouth_tilt, mouth_v - mood.mouth_curve - mood.mouth_tilt)
    points = [(-0.42, eye_v), (0.42, eye_v), (0.0, tip_v), (-half_width, corner_vs[0]), (half_width, corner_vs[1])]
    shift = (pose.camera.shift[0] * size, pose.camera.shift[1] * size)
    moved: list[float] = []
    for u, v in points:
        x, y = rotated_point(*pose.frame.xy(u, v), pose.camera.rotation_degrees, shift, size)
        moved += [x - 0.5, y - 0.5]  # PIL draws in edge coordinates: its x = 30 is the middle of pixels 29 and 30
    return moved


def rotated_point(x: float, y: float, degrees: float, shift: tuple[float, float], size: int) -> tuple[float, float]:
    """Where ``Image.rotate(degrees, translate=shift)`` moves pixel (x, y) of a ``size`` px square image:
    counter-clockwise about the centre, then shifted."""
    angle = math.radians(degrees)
    dx, dy = x - size / 2, y - size / 2
    return (size / 2 + math.cos(angle) * dx + math.sin(angle) * dy + shift[0],
            size / 2 - math.sin(angle) * dx + math.cos(angle) * dy + shift[1])


def list_synthetic(
    num_samples: int,
    tasks: Sequence[str],
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    size: int = 160,
    dataset: str = "synthetic",
    framing: str = "tight",
) -> SourceListing:
    """List ``num_samples`` synthetic faces labelled for ``tasks`` only; images render when loaded.

    Sample ``i`` is fully determined by ``(seed, i)``, so any process lists the same faces.
    """
    unknown = [task for task in tasks if task not in known_tasks()]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(known_tasks())}")
    undrawable = [task for task in tasks if task not in SYNTHETIC_TASKS and get_task(task).kind != "binary"]
    if undrawable:
        raise ValueError(f"synthetic faces cannot draw task(s) {undrawable}: they draw {', '.join(SYNTHETIC_TASKS)} "
                         "and any declared binary task")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; choose one of {', '.join(FRAMINGS)}")
    listing = SourceListing(dataset)
    for index in range(num_samples):
        rng = np.random.default_rng([seed, index])
        face = draw_face_attributes(rng)
        image_seed = int(rng.integers(2**63))
        key = f"synth{seed}_{index:07d}"
        drawn = face_labels(face)
        labels: dict[str, LabelValue] = {}
        for task in tasks:
            if task == LANDMARKS_TASK:
                labels[task] = face_landmarks(face, image_seed, size, framing)
            else:
                labels[task] = drawn[task] if task in drawn else derived_attribute(face, task)
        split = seeded_split(seed, key, val_fraction, test_fraction)
        source_id = key if framing == "tight" else f"{key} ({framing} framing)"  # other pixels: another plan
        listing.add(key, split, labels, source_id, SyntheticImage(image_seed, face, size, framing))
    listing.notes.append(f"{num_samples} synthetic faces, seed {seed}, {size}x{size} px, {framing} framing, "
                         f"tasks {', '.join(tasks)}")
    return listing
