"""The FER classes in FERPlus order, and their default valence/arousal anchors (SPEC section 3)."""

FER_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")

# The two affect dimensions, in the order every (valence, arousal) pair and N x 2 array keeps them.
VA_DIMENSIONS = ("valence", "arousal")

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

# Each dataset's own expression codes, by FERPlus class name; any other code is dropped and counted.
CKPLUS_CODES = {1: "anger", 2: "contempt", 3: "disgust", 4: "fear", 5: "happiness", 6: "sadness", 7: "surprise"}
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger",
                   7: "contempt"}
AFFECTNET_UNUSABLE = {8: "None", 9: "Uncertain", 10: "No-Face"}

# Class names as datasets and folder layouts spell them (case-insensitive), by FERPlus class name.
CLASS_ALIASES = {
    "neutral": "neutral", "happiness": "happiness", "happy": "happiness", "surprise": "surprise",
    "surprised": "surprise", "sadness": "sadness", "sad": "sadness", "anger": "anger", "angry": "anger",
    "disgust": "disgust", "disgusted": "disgust", "fear": "fear", "fearful": "fear", "contempt": "contempt",
}
