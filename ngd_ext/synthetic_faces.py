"""The embedded default faces: synthetic 48x48 grey faces with FERPlus-like votes, written as fer2013.csv +
fer2013new.csv so that they go through the real FERPlus reader.

Each face is drawn from an identity (face shape, skin tone, eye spacing), a pose (tilt, shift, scale), a
lighting gradient and noise, and the expression of its class: mouth curvature and opening, brow angle and
height, eye opening, and for contempt a one-sided smirk. Ten simulated annotators vote: most for the drawn
class, some for a confusable class, a few for unknown or not-a-face, so that the official majority rule
keeps most images and drops some. Class frequencies follow FERPlus's. `style` changes the rendering
(contrast, blur, framing) for the cross-dataset sets. These are synthetic images: nothing learned or
measured on them says anything about real faces.
"""

import csv
import os

import numpy as np

from ngd_ext.artifacts import atomic_path
from ngd_ext.emotions import FER_CLASSES
from ngd_ext.ferplus import IMAGE_SIDE, VOTE_COLUMNS

# FERPlus's training-set class shares (majority rule), neutral ... contempt.
CLASS_SHARES = np.array([0.349, 0.291, 0.126, 0.120, 0.084, 0.005, 0.021, 0.005])

# mouth curvature (+ smile), mouth opening, brow slant (+ inner ends down), brow height, eye opening, smirk
EXPRESSIONS = {
    "neutral":   (0.0, 0.05, 0.0, 0.0, 0.55, 0.0),
    "happiness": (0.9, 0.35, 0.0, 0.05, 0.40, 0.0),
    "surprise":  (0.0, 0.95, 0.0, 0.55, 1.00, 0.0),
    "sadness":   (-0.7, 0.05, -0.6, 0.05, 0.35, 0.0),
    "anger":     (-0.35, 0.20, 0.8, -0.35, 0.65, 0.0),
    "disgust":   (-0.5, 0.30, 0.45, -0.20, 0.25, 0.0),
    "fear":      (-0.25, 0.65, -0.45, 0.40, 0.95, 0.0),
    "contempt":  (0.15, 0.05, 0.1, 0.0, 0.50, 0.8),
}
# The class annotators confuse each class with most often.
CONFUSION = {"neutral": "sadness", "happiness": "neutral", "surprise": "fear", "sadness": "neutral",
             "anger": "disgust", "disgust": "anger", "fear": "surprise", "contempt": "neutral"}
STYLES = {  # contrast, blur passes, face scale, background level
    "ferplus": (1.0, 0, 1.0, 0.45),
    "ckplus": (1.3, 1, 1.15, 0.2),
    "affectnet": (0.8, 0, 0.85, 0.6),
}
# FER2013's own emotion codes for its 'emotion' column (it has no contempt; FERPlus relabelled with votes).
FER2013_CODE = {"anger": 0, "disgust": 1, "fear": 2, "happiness": 3, "sadness": 4, "surprise": 5, "neutral": 6,
                "contempt": 6}


def _soft(distance, width=0.6):
    """1 inside (distance < 0), 0 outside, with a one-pixel ramp: anti-aliased shapes."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / width, -30, 30)))


def draw_face(rng, expression, style="ferplus", size=IMAGE_SIDE):
    """One grey face, uint8 size x size, for an expression given as the EXPRESSIONS tuple."""
    curve, opening, slant, brow_height, eye_open, smirk = np.array(expression) + rng.normal(0, 0.08, 6)
    contrast, blur, scale, background = STYLES[style]
    scale *= rng.uniform(0.9, 1.1)
    tilt = rng.normal(0, 0.08)
    shift = rng.normal(0, 1.5, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = x - size / 2 - shift[0], y - size / 2 - shift[1]
    x, y = (np.cos(tilt) * x + np.sin(tilt) * y) / scale, (-np.sin(tilt) * x + np.cos(tilt) * y) / scale

    width, height = rng.uniform(14, 17), rng.uniform(18, 21)
    skin, dark = rng.uniform(0.55, 0.85), rng.uniform(0.05, 0.2)
    image = np.full((size, size), background + rng.normal(0, 0.05))
    face = _soft((np.sqrt((x / width) ** 2 + (y / height) ** 2) - 1) * width)
    image = image * (1 - face) + skin * face

    eye_x, eye_y = rng.uniform(5.5, 7.5), -4.0
    for side in (-1, 1):
        eye = np.sqrt(((x - side * eye_x) / 3.0) ** 2 + ((y - eye_y) / (0.4 + 2.2 * eye_open)) ** 2) - 1
        image = image * (1 - _soft(eye * 2.2)) + dark * _soft(eye * 2.2)
        # brow: a thick segment above the eye; slant lowers its inner end
        inner, outer = np.array([side * 2.5, eye_y - 5 - 3 * brow_height + 2 * slant]), \
            np.array([side * (eye_x + 4), eye_y - 5.5 - 3 * brow_height - slant])
        along = np.clip(((x - inner[0]) * (outer - inner)[0] + (y - inner[1]) * (outer - inner)[1])
                        / np.sum((outer - inner) ** 2), 0, 1)
        distance = np.hypot(x - inner[0] - along * (outer - inner)[0], y - inner[1] - along * (outer - inner)[1])
        image = image * (1 - _soft(distance - 1.0)) + dark * _soft(distance - 1.0)

    mouth_y, half_width = rng.uniform(8.5, 10.5), rng.uniform(5.5, 7.0)
    u = np.clip(x / half_width, -1.5, 1.5)
    lift = curve * (u ** 2) * 3.0 + smirk * np.maximum(u, 0) * 2.5  # corners up for a smile, one side for a smirk
    upper = mouth_y - lift - 0.6 * opening * 3.0 * (1 - u ** 2)
    lower = mouth_y - lift + 0.6 + opening * 3.5 * (1 - u ** 2)
    inside = np.maximum(np.maximum(upper - y, y - lower), (np.abs(x) - half_width))
    image = image * (1 - _soft(inside)) + dark * _soft(inside)

    light = rng.normal(0, 0.15, 2)
    image = (image - 0.5) * contrast + 0.5 + light[0] * x / size + light[1] * y / size
    for _ in range(blur):
        image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0) + np.roll(image, 1, 1) + np.roll(image, -1, 1)) / 5
    image += rng.normal(0, 0.03, image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def annotator_votes(rng, class_index):
    """Ten annotators' votes over the FERPlus columns (8 classes, unknown, NF)."""
    name = FER_CLASSES[class_index]
    clarity = rng.uniform(0.45, 0.95)  # how readable this face is
    probabilities = np.full(len(VOTE_COLUMNS), 0.01)
    probabilities[class_index] += clarity
    probabilities[FER_CLASSES.index(CONFUSION[name])] += (1 - clarity) * 0.7
    probabilities[VOTE_COLUMNS.index("unknown")] += (1 - clarity) * 0.25
    probabilities[VOTE_COLUMNS.index("NF")] += 0.01
    return rng.multinomial(10, probabilities / probabilities.sum())


def make_faces(count, seed, style="ferplus", shares=CLASS_SHARES):
    """(images N x 48 x 48 uint8, drawn class N, votes N x 10)."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(FER_CLASSES), size=count, p=shares / shares.sum())
    images = np.stack([draw_face(rng, EXPRESSIONS[FER_CLASSES[c]], style) for c in classes])
    votes = np.stack([annotator_votes(rng, c) for c in classes])
    return images, classes, votes


def write_synthetic_ferplus(folder, seed, train=2400, valid=400, test=400):
    """fer2013.csv + fer2013new.csv with the three FERPlus splits, in FERPlus's row order (train first)."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for offset, (usage, count) in enumerate((("Training", train), ("PublicTest", valid), ("PrivateTest", test))):
        images, classes, votes = make_faces(count, seed=[seed, offset])
        rows += [(usage, image, c, v) for image, c, v in zip(images, classes, votes)]
    with atomic_path(os.path.join(folder, "fer2013.csv")) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["emotion", "pixels", "Usage"])
            for usage, image, c, _ in rows:
                writer.writerow([FER2013_CODE[FER_CLASSES[c]], " ".join(map(str, image.ravel())), usage])
    with atomic_path(os.path.join(folder, "fer2013new.csv")) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Usage", "Image name", *VOTE_COLUMNS])
            for i, (usage, _, _, votes) in enumerate(rows):
                writer.writerow([usage, f"fer{i:07d}.png", *votes])
