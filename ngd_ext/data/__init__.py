"""Every file format the stages read, and its synthetic stand-in: EEG (eeg.py, eeg_features.py, eeg_cache.py),
FERPlus (ferplus.py), the target face sets (faces.py, face_crop.py), CSV and image files (files.py), the synthetic
default (synthetic_eeg.py, synthetic_faces.py); and the face sets as torch Datasets (datasets.py): ngd_ext.data.FERPlus,
AffectNet, CKPlus, FaceManifest."""

__all__ = ["AffectNet", "CKPlus", "FERPlus", "FaceManifest", "Faces"]


def __getattr__(name):
    """The Datasets, imported on first use: a stage that reads EEG alone need not load the face readers."""
    if name in __all__:
        from ngd_ext.data import datasets
        return getattr(datasets, name)
    raise AttributeError(f"module 'ngd_ext.data' has no attribute {name!r}")
