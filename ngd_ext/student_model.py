"""The facial-expression student: a torchvision ResNet-18 or ResNet-50 on grey images, with a classifier
over the 8 FERPlus classes and a projection head to the prototype dimension E. The projection serves
Proto-KD and D-Geo in training; at inference only the classifier runs."""

import torch
import torch.nn as nn
import torchvision

ARCHITECTURES = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}


class Student(nn.Module):
    def __init__(self, arch="resnet18", num_classes=8, embedding_size=128):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
        backbone = ARCHITECTURES[arch](weights=None)  # never a download
        backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.classifier = nn.Linear(features, num_classes)
        self.projection = nn.Sequential(nn.Linear(features, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, embedding_size))

    def forward(self, images):
        features = self.backbone(images)
        return self.classifier(features), self.projection(features)


def load_backbone_weights(model, path):
    """Initialise the backbone from a local state_dict file: a torchvision ResNet's (RGB first convolution
    summed to one grey channel, its fc dropped) or a Student's; a `module.` prefix (DDP) is removed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable state_dict file ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    if "conv1.weight" in state and state["conv1.weight"].shape[1] == 3:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)  # grey = R = G = B
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path}: does not fit this backbone: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, wrong shapes {wrong_shape[:3]} "
                         "(another architecture?)")
    model.backbone.load_state_dict(state)
