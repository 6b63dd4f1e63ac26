"""Face crops for evaluation and prediction, matched to the training images (grey, 48 x 48, FERPlus framing).

Where a face is: the dataset's own box when it has one; otherwise OpenCV's frontal-face Haar cascade (the
largest detection); otherwise, when the cascade finds nothing, the largest centred square of the image,
and the image is counted as such. The box is widened by CROP_MARGIN on every side, because the cascade's
box runs from the brows to the chin while FERPlus faces include the forehead; parts outside the image
repeat its edge pixels.
"""

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from ngd_ext.data.ferplus import IMAGE_SIDE

CROP_MARGIN = 0.13
HOW = ("box", "detected", "centre")  # where a crop came from


@dataclass(frozen=True)
class Crop:
    face: np.ndarray  # IMAGE_SIDE x IMAGE_SIDE uint8
    box: tuple        # (x, y, width, height) in the source image, before the margin
    how: str          # one of HOW


class FaceCropper:
    def __init__(self, min_face_fraction=0.15):
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load its face cascade {path}: reinstall opencv-python-headless<5")
        self.min_face_fraction = min_face_fraction

    def detect(self, grey):
        """Every face box (x, y, width, height) the cascade finds, largest first."""
        side = max(1, int(self.min_face_fraction * min(grey.shape)))
        boxes = self.cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return sorted((tuple(int(v) for v in box) for box in boxes), key=lambda box: -box[2] * box[3])

    def faces(self, grey):
        """A crop of every face the cascade finds in a grey uint8 image, largest first; or, when it finds none,
        one crop of the centre square."""
        found = self.detect(grey)
        if not found:
            square = centre_square(grey.shape)
            return [Crop(cut(grey, square), square, "centre")]
        return [Crop(cut(grey, box), box, "detected") for box in found]

    def crop(self, grey, box=None):
        """The face of a grey uint8 image: from `box` when given, else the largest detection, else the centre."""
        if box is not None:
            return Crop(cut(grey, box), tuple(int(v) for v in box), "box")
        return self.faces(grey)[0]


_per_thread = threading.local()


def thread_cropper():
    """This thread's FaceCropper: a cascade classifier must not be shared between threads. The threads that
    call this give the parallelism, so OpenCV's own thread pool is turned off."""
    if not hasattr(_per_thread, "cropper"):
        cv2.setNumThreads(1)
        _per_thread.cropper = FaceCropper()
    return _per_thread.cropper


def centre_square(shape):
    height, width = shape[:2]
    side = min(height, width)
    return ((width - side) // 2, (height - side) // 2, side, side)


def cut(grey, box, margin=CROP_MARGIN, side=IMAGE_SIDE):
    """The square around `box` (its longer side, widened by `margin`), resized to side x side."""
    x, y, width, height = box
    if width <= 0 or height <= 0:
        raise ValueError(f"face box {box}: width and height must be positive")
    centre_x, centre_y = x + width / 2, y + height / 2
    half = max(width, height) * (1 + 2 * margin) / 2
    left, top = int(round(centre_x - half)), int(round(centre_y - half))
    extent = max(1, int(round(2 * half)))
    pad = max(0, -left, -top, left + extent - grey.shape[1], top + extent - grey.shape[0])
    if pad:
        grey = np.pad(grey, pad, mode="edge")
    square = grey[top + pad:top + pad + extent, left + pad:left + pad + extent]
    interpolation = cv2.INTER_AREA if extent > side else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(square), (side, side), interpolation=interpolation)
