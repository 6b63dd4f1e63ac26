"""The datasets as torch.utils.data.Dataset of (image, label), for a training loop of one's own: FERPlus under its label
rule, and the target sets stage 4 reads (AffectNet, CK+, a manifest), each through the same reader, with its checks.
An image is a uint8 1 x 48 x 48 tensor (a grey face, cropped as in training) before `transform`; a label is a
FERPlus class index (FERPlus's probability rule: its 8-way vote distribution)."""

import torch
from torch.utils.data import Dataset

from ngd_ext.data.faces import affectnet_records, ckplus_records, manifest_records, read_class_map, read_faces
from ngd_ext.data.ferplus import SPLITS, FerPlusError, apply_rule, load_ferplus, load_ferplus_cached, read_votes

LABEL_RULES = ("majority", "probability")


class FERPlus(Dataset):
    """FERPlus from either official layout (fer2013.csv + fer2013new.csv, or the FER2013{Train,Valid,Test} folders),
    split 'train', 'valid' or 'test', under the official majority rule or, for training, the probability rule (valid and
    test always take the majority rule). Its length needs only the votes; the images are decoded at the first item
    (under cache_dir, once for every split, where one is given)."""

    def __init__(self, root, split="train", label_rule="majority", transform=None, cache_dir=None):
        if split not in SPLITS or label_rule not in LABEL_RULES:
            raise ValueError(f"FERPlus: split must be one of {SPLITS} and label_rule one of {LABEL_RULES}, got "
                             f"{split!r} and {label_rule!r}")
        self.root, self.split, self.transform, self.cache_dir = root, split, transform, cache_dir
        self.label_rule = label_rule if split == "train" else "majority"
        rows, self.labels, self.targets = apply_rule(read_votes(root), split, self.label_rule)
        self.names = [row.name for row in rows]
        self._images = None

    def __len__(self):
        return len(self.labels)

    def images(self):
        """All the split's images, uint8 N x 48 x 48, decoded once."""
        if self._images is None:
            splits = (load_ferplus_cached(self.root, self.cache_dir, self.label_rule)[0] if self.cache_dir
                      else load_ferplus(self.root, self.label_rule))
            if splits[self.split].names != self.names:
                raise FerPlusError(f"{self.root}: its files changed since the votes were read; build the dataset anew")
            self._images = torch.from_numpy(splits[self.split].images)
        return self._images

    def __getitem__(self, index):
        image = self.images()[index].unsqueeze(0)
        label = torch.from_numpy(self.targets[index]) if self.label_rule == "probability" else int(self.labels[index])
        return (self.transform(image) if self.transform else image), label


class Faces(Dataset):
    """A target set's faces (an ngd_ext.data.faces.FaceSet: decoded and cropped at construction) as a Dataset;
    `faces` keeps the rest: groups, valence/arousal ratings, what was dropped and how each face was found."""

    def __init__(self, faces, transform=None):
        self.faces, self.transform = faces, transform
        self.images = torch.from_numpy(faces.images)

    def __len__(self):
        return len(self.faces.labels)

    def __getitem__(self, index):
        image = self.images[index].unsqueeze(0)
        return (self.transform(image) if self.transform else image), int(self.faces.labels[index])


class AffectNet(Faces):
    """AffectNet from any layout stage 4 reads ('validation' or 'training' split), its labels in FERPlus's order."""

    def __init__(self, root, split="validation", transform=None, skip_unreadable=False):
        super().__init__(read_faces("AffectNet", *affectnet_records(root, split), skip_unreadable), transform)


class CKPlus(Faces):
    """CK+'s sequence tree (the last 3 frames of a labelled sequence, and its first as neutral) or class folders."""

    def __init__(self, root, transform=None, skip_unreadable=False):
        super().__init__(read_faces("CK+", *ckplus_records(root), skip_unreadable), transform)


class FaceManifest(Faces):
    """A manifest CSV (an image path and a label column; the paper's release's headers read as they are), index
    labels mapped through class_map, a --class-map JSON file, where given."""

    def __init__(self, path, class_map=None, transform=None, skip_unreadable=False):
        mapping = read_class_map(class_map) if class_map else None
        super().__init__(read_faces(path, *manifest_records(path, mapping), skip_unreadable), transform)
