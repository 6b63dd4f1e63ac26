"""The FER classes in FERPlus order, and their default valence/arousal anchors (SPEC section 3)."""

FER_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")

# Approximate positions on Russell's circumplex, (valence, arousal) in [-1, 1].
DEFAULT_ANCHORS = {
    "neutral": (0.0, 0.0),
    "happiness": (0.8, 0.4),
    "surprise": (0.3, 0.8),
    "sadness": (-0.7, -0.4),
    "anger": (-0.7, 0.7),
    "disgust": (-0.7, 0.3),
    "fear": (-0.5, 0.8),
    "contempt": (-0.5, 0.1),
}

# Classes under the D-Geo variance cap.
DEFAULT_POSITIVE = ("happiness", "surprise")
