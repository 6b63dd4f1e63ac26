"""The embedded default faces: synthetic 48x48 grey faces with FERPlus-like votes, written as fer2013.csv +
fer2013new.csv so that they go through the real FERPlus reader; and, for stage 4, a CK+-structured tree of
sequences (faces somewhere in larger frames, to be found by the face detector) and an AffectNet-structured
validation.csv with colour JPEGs and face boxes, drawn in other styles.

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

import cv2
import numpy as np
from PIL import Image

from ngd_ext.artifacts import atomic_dir, atomic_path, folder_lock
from ngd_ext.data.ferplus import IMAGE_SIDE, VOTE_COLUMNS
from ngd_ext.emotions import AFFECTNET_CODES, CKPLUS_CODES, DEFAULT_ANCHORS, FER_CLASSES

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
        image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0) + np.roll(image, 1, 1)
                 + np.roll(image, -1, 1)) / 5
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


FERPLUS_SIZES = {"demo": dict(train=2400, valid=400, test=400), "tiny": dict(train=640, valid=160, test=160)}


def synthetic_ferplus(run_dir, size, seed, write=True):
    """The folder of a run's embedded default FERPlus (`size` one of FERPLUS_SIZES), written on first use
    unless write=False."""
    folder = os.path.join(run_dir, "data", f"synthetic_ferplus_{size}_seed{seed}")
    if write:
        with folder_lock(folder, wait=True):  # stage-3 runs of several names may start at once
            if not os.path.isfile(os.path.join(folder, "fer2013new.csv")):  # written last
                write_synthetic_ferplus(folder, seed, **FERPLUS_SIZES[size])
    return folder


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


# CK+'s labelled sequences per emotion code (1 anger ... 7 surprise), for the synthetic CK+ tree.
CKPLUS_SEQUENCES = {1: 45, 2: 18, 3: 59, 4: 25, 5: 69, 6: 28, 7: 83}
AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                    "expression", "valence", "arousal"]


def place_face(rng, face, canvas_shape, face_side, style):
    """A face (48 x 48 uint8) enlarged to face_side and put at a random place on a noisy canvas of the style's
    background: (canvas uint8, (x, y, width, height) of the face)."""
    height, width = canvas_shape
    background = STYLES[style][3] * 255
    ramp = (np.linspace(-1, 1, width)[None, :] * rng.normal(0, 20)
            + np.linspace(-1, 1, height)[:, None] * rng.normal(0, 20))
    canvas = background + ramp + rng.normal(0, 6, canvas_shape)
    x, y = int(rng.integers(0, width - face_side + 1)), int(rng.integers(0, height - face_side + 1))
    canvas[y:y + face_side, x:x + face_side] = cv2.resize(face, (face_side, face_side), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), (x, y, face_side, face_side)


def write_synthetic_ckplus(folder, seed, sequences=80, unlabelled=12, frames=8, frame_shape=(240, 320)):
    """A CK+-structured tree: cohn-kanade-images/Sxxx/yyy/Sxxx_yyy_0000000n.png, each sequence going from a
    neutral face to its expression's apex, somewhere in a larger frame, in the 'ckplus' style; and
    Emotion/Sxxx/yyy/Sxxx_yyy_<last frame>_emotion.txt for the labelled sequences (the emotion shares are
    CK+'s); `unlabelled` sequences have no Emotion file, as in CK+. Written whole or not at all."""
    rng = np.random.default_rng([seed, 7])
    codes = np.array(sorted(CKPLUS_SEQUENCES))
    shares = np.array([CKPLUS_SEQUENCES[c] for c in codes], dtype=np.float64)
    labels = [int(code) for code in rng.choice(codes, size=sequences, p=shares / shares.sum())] + [None] * unlabelled
    neutral = np.array(EXPRESSIONS["neutral"])
    with atomic_dir(folder) as root:
        for index, code in enumerate(labels):
            subject, sequence = f"S{100 + index // 3:03d}", f"{index % 3 + 1:03d}"
            shown = CKPLUS_CODES[code] if code else FER_CLASSES[rng.integers(len(FER_CLASSES))]
            apex = np.array(EXPRESSIONS[shown])
            sequence_seed, face_side = int(rng.integers(2**63)), int(rng.integers(90, 140))
            image_dir = os.path.join(root, "cohn-kanade-images", subject, sequence)
            os.makedirs(image_dir)
            for frame in range(1, frames + 1):
                # The same seed for every frame: one person, pose and place; only the expression moves.
                frame_rng = np.random.default_rng(sequence_seed)
                face = draw_face(frame_rng, neutral + (apex - neutral) * (frame - 1) / (frames - 1), "ckplus")
                canvas, _ = place_face(frame_rng, face, frame_shape, face_side, "ckplus")
                Image.fromarray(canvas).save(os.path.join(image_dir, f"{subject}_{sequence}_{frame:08d}.png"))
            if code:
                emotion_dir = os.path.join(root, "Emotion", subject, sequence)
                os.makedirs(emotion_dir)
                with open(os.path.join(emotion_dir, f"{subject}_{sequence}_{frames:08d}_emotion.txt"), "w") as handle:
                    handle.write(f"   {float(code):.7e}\n")


def write_synthetic_affectnet(folder, seed, per_class=50, unusable=24):
    """An AffectNet-structured set: Manually_Annotated_file_lists/validation.csv (AffectNet's columns, its
    expression codes, face boxes, valence and arousal; codes 8-10, None / Uncertain / No-Face, with V/A -2)
    and Manually_Annotated_Images/<n>/<name>.jpg, colour JPEGs of differing sizes in the 'affectnet' style.
    Balanced over the 8 classes, like AffectNet's validation set. Written whole or not at all."""
    rng = np.random.default_rng([seed, 11])
    codes = ([code for code in AFFECTNET_CODES for _ in range(per_class)]
             + [int(c) for c in rng.integers(8, 11, unusable)])
    rows = []
    with atomic_dir(folder) as root:
        for index in rng.permutation(len(codes)):
            code = codes[index]
            name = AFFECTNET_CODES.get(code, "neutral")
            face = draw_face(rng, EXPRESSIONS[name], "affectnet")
            side = int(rng.integers(120, 200))
            canvas, box = place_face(rng, face, (side, side), int(side * rng.uniform(0.6, 0.8)), "affectnet")
            colour = np.clip(canvas[..., None] * rng.uniform(0.85, 1.15, 3), 0, 255).astype(np.uint8)
            relative = f"{index % 7 + 1}/{rng.bytes(20).hex()}.jpg"
            path = os.path.join(root, "Manually_Annotated_Images", relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(colour).save(path, quality=90)
            if code in AFFECTNET_CODES:
                valence, arousal = np.clip(np.array(DEFAULT_ANCHORS[name]) + rng.normal(0, 0.15, 2), -1, 1)
            else:
                valence = arousal = -2.0
            rows.append([relative, *box, "", code, f"{valence:.6f}", f"{arousal:.6f}"])
        os.makedirs(os.path.join(root, "Manually_Annotated_file_lists"))
        with open(os.path.join(root, "Manually_Annotated_file_lists", "validation.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(AFFECTNET_HEADER)
            writer.writerows(rows)
