"""The facial-expression student: a torchvision ResNet-18 or ResNet-50 on grey images, with a classifier
over the 8 FERPlus classes and a projection head to the prototype dimension E. The projection serves
Proto-KD and D-Geo in training; at inference only the classifier runs."""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ngd_ext import artifacts

ARCHITECTURES = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
# The entries of a stage-3 config that say how the run was executed, not what it learned: a resumed run may change
# them, and students that differ only in them (and in the seed) are replicates of one recipe.
EXECUTION_SETTINGS = ("world_size", "checkpoint_every", "amp", "precision")


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
    state = artifacts.load_checkpoint(path, "a state_dict file")
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


def preprocess(images, size):
    """uint8 N x 48 x 48 images (a tensor) -> the network's float N x 1 x size x size input."""
    x = images.float().div(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.25


def load_student(path, num_classes=8):
    """A stage-3 checkpoint as (Student in eval mode on the CPU, its config). A file that is not one, or holds
    a student of another class count or architecture than its config says, is refused naming the file."""
    checkpoint = artifacts.load_checkpoint(path, "a stage-3 checkpoint", ["config", "state_dict"])
    try:
        arch, embedding_size = checkpoint["config"]["arch"], checkpoint["config"]["embedding_size"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a stage-3 checkpoint (its config lacks {error})") from error
    config, state = checkpoint["config"], checkpoint["state_dict"]
    classes = tuple(state["classifier.weight"].shape)[0] if "classifier.weight" in state else None
    if classes != num_classes:
        raise ValueError(f"{path}: not a stage-3 checkpoint of an {num_classes}-class student (its classifier has "
                         f"{classes} outputs)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
    model = Student(arch, num_classes, embedding_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights are not those of the {arch} student its config names "
                         f"({str(error).splitlines()[0]} ...)") from error
    return model.eval(), config


class FaceCropsToScores(nn.Module):
    """A student with its preprocessing: uint8 N x 48 x 48 face crops in, (logits N x C, embeddings N x E) out, as
    `predict` gives them. It is what `export_student` exports."""

    def __init__(self, student, size):
        super().__init__()
        self.student, self.size = student, size

    def forward(self, faces):
        return self.student(preprocess(faces, self.size))


EXPORT_METADATA = "ngd_ext.json"  # the name of the metadata an exported program carries among its extra files


def export_student(model, config, path, metadata):
    """Write the student (in eval mode, on the CPU) with its preprocessing as a torch.export program (.pt2) that
    torch.export.load runs without this package: any number of uint8 48 x 48 crops in. `metadata` (a JSON-able
    dict) goes with it as the extra file EXPORT_METADATA. The saved program is loaded back and must give the
    model's outputs on a batch of random crops before it takes the name `path`."""
    deployed = FaceCropsToScores(model.eval().cpu(), config["input_size"])
    example = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(deployed, (example,), dynamic_shapes={"faces": {0: torch.export.Dim("faces")}})
    # through file objects: given a path, torch.export insists on one that ends in .pt2, as the temporary does not
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.export.save(program, handle, extra_files={EXPORT_METADATA: json.dumps(metadata, indent=1)})
        with open(temporary, "rb") as handle, torch.no_grad():
            for got, expected in zip(torch.export.load(handle).module()(example), deployed(example)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def predict(model, images, size, device, batch_size=512):
    """(logits N x C, embeddings N x E) as float32 numpy arrays for uint8 N x 48 x 48 images."""
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        batch = preprocess(torch.from_numpy(images[start:start + batch_size]).to(device), size)
        batch_logits, batch_embeddings = model(batch)
        logits.append(batch_logits.float().cpu())
        embeddings.append(batch_embeddings.float().cpu())
    if not logits:
        raise ValueError("no images to predict")
    return torch.cat(logits).numpy(), torch.cat(embeddings).numpy()


PRESET_ORDER = ("B0", "B1", "B2", "B3")  # each adds one term to the one before


def preset_of(config):
    """'B0'..'B3' when the loss terms in use are a preset's, 'Full (T=1)' for B3 with KL distillation at T = 1 (the
    paper's row of that name), else 'custom'."""
    used = (config["kd_weight"] > 0, config["proto_weight"] > 0, config["dgeo_weight"] > 0)
    presets = {(False, False, False): "B0", (True, False, False): "B1", (True, True, False): "B2",
               (True, True, True): "B3"}
    preset = presets.get(used, "custom")
    if preset == "B3" and config.get("kd_loss") == "kl" and config.get("kd_temperature") == 1:
        return "Full (T=1)"
    return preset


def label_of(name, config):
    """A student's name in tables and titles: its run name, and its preset when the name does not say it."""
    preset = preset_of(config)
    return name if name == preset else f"{name} ({preset})"

