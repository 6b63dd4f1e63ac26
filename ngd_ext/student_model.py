"""The facial-expression student: a torchvision classification model (or, where timm is installed, one of timm's) on
grey images, its first convolution taking one channel and its ImageNet classifier dropped, with a classifier over the
8 FERPlus classes and a projection head to the prototype dimension E on its pooled features. The projection serves
Proto-KD and D-Geo in training; at inference only the classifier runs."""

import importlib.util
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ngd_ext import artifacts

# torchvision's backbones that serve here; timm's as "timm:NAME" where timm is installed.
ARCHITECTURES = ("convnext_tiny", "efficientnet_b0", "mobilenet_v3_large", "resnet18", "resnet50", "vit_b_16")
PATCHED = {"vit_b_16": 16}  # the backbones that cut the image into patches: the input side must be a multiple
# The entries of a stage-3 config that say how the run was executed, not what it learned: a resumed run may change
# them, and students that differ only in them (and in the seed) are replicates of one recipe.
EXECUTION_SETTINGS = ("world_size", "checkpoint_every", "amp", "precision", "tensorboard", "compile")


def check_architecture(arch, input_size):
    """The reason this backbone cannot serve at this input size, or None: an unknown name, timm absent, a ViT's input
    side not a multiple of its patch."""
    if arch.startswith("timm:"):
        return None if importlib.util.find_spec("timm") else f"{arch} needs timm (pip install timm)"
    if arch not in ARCHITECTURES:
        return f"{arch!r} is not one of {', '.join(ARCHITECTURES)}, nor timm:NAME"
    if arch in PATCHED and input_size % PATCHED[arch]:
        return f"{arch} cuts its input into {PATCHED[arch]}-pixel patches: give an --input-size that is a multiple"
    return None


def _replace(model, name, module):
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)


def backbone(arch, input_size=224):
    """(a model that gives pooled features of one grey image channel, their width, the name of the ImageNet
    classifier it dropped): its first 3-channel convolution takes one channel, its last 1000-way layer is gone."""
    if arch.startswith("timm:"):
        import timm  # an optional dependency

        model = timm.create_model(arch[len("timm:"):], pretrained=False, num_classes=0, in_chans=1)
        return model, model.num_features, model.pretrained_cfg.get("classifier", "head")
    extra = {"image_size": input_size} if arch in PATCHED else {}
    model = getattr(torchvision.models, arch)(weights=None, **extra)  # never a download
    stem = next(name for name, module in model.named_modules()
                if isinstance(module, nn.Conv2d) and module.in_channels == 3)
    conv = model.get_submodule(stem)
    _replace(model, stem, nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                    conv.groups, conv.bias is not None, conv.padding_mode))
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    features = model.get_submodule(head).in_features
    _replace(model, head, nn.Identity())
    return model, features, head


class Student(nn.Module):
    def __init__(self, arch="resnet18", num_classes=8, embedding_size=128, input_size=48):
        super().__init__()
        problem = check_architecture(arch, input_size)
        if problem:
            raise ValueError(problem)
        self.backbone, features, self.dropped_head = backbone(arch, input_size)
        self.arch, self.input_size = arch, input_size
        self.classifier = nn.Linear(features, num_classes)
        self.projection = nn.Sequential(nn.Linear(features, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, embedding_size))

    def forward(self, images):
        features = self.backbone(images).flatten(1)
        return self.classifier(features), self.projection(features)


def load_backbone_weights(model, path):
    """Initialise the backbone from a local state_dict file: its architecture's ImageNet weights (torchvision's or
    timm's; RGB convolutions summed to one grey channel, the ImageNet classifier dropped, a ViT's position embeddings
    resized to the input) or a Student's; a `module.` prefix (DDP) is removed."""
    state = artifacts.load_checkpoint(path, "a state_dict file")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    state = {key: value for key, value in state.items() if not key.startswith(model.dropped_head + ".")}
    expected = model.backbone.state_dict()
    for key, value in state.items():
        wanted = expected.get(key)
        if wanted is not None and value.dim() == 4 and value.shape[1] == 3 and wanted.shape[1] == 1:
            state[key] = value.sum(dim=1, keepdim=True)  # grey = R = G = B
    if model.arch in PATCHED and "encoder.pos_embedding" in state:
        state = torchvision.models.vision_transformer.interpolate_embeddings(model.input_size, PATCHED[model.arch],
                                                                            state)
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
    problem = check_architecture(arch, config.get("input_size", 48))
    if problem:
        raise ValueError(f"{path}: its architecture: {problem}")
    model = Student(arch, num_classes, embedding_size, config.get("input_size", 48))
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
    deployed = FaceCropsToScores(model.cpu(), config["input_size"]).eval()
    example = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(deployed, (example,), dynamic_shapes={"faces": {0: torch.export.Dim("faces")}})
    # through file objects: given a path, torch.export insists on one that ends in .pt2, as the temporary does not
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.export.save(program, handle, extra_files={EXPORT_METADATA: json.dumps(metadata, indent=1)})
        with open(temporary, "rb") as handle, torch.no_grad():
            for got, expected in zip(torch.export.load(handle).module()(example), deployed(example)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # to write the ONNX file, and to check it by running it


def onnx_available():
    return all(importlib.util.find_spec(name) for name in ONNX_PACKAGES)


def export_onnx(model, config, path, metadata):
    """Write the student with its preprocessing as an ONNX model, as export_student writes its program (`metadata` in
    its metadata_props under EXPORT_METADATA); onnxruntime runs it on a batch of random crops, and it must give the
    model's outputs before it takes the name `path`."""
    import onnx
    import onnxruntime

    deployed = FaceCropsToScores(model.cpu(), config["input_size"]).eval()
    example = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with artifacts.atomic_path(path) as temporary:
        exported = torch.onnx.export(deployed, (torch.zeros(3, 48, 48, dtype=torch.uint8),), dynamo=True,
                                     dynamic_shapes={"faces": {0: torch.export.Dim("faces")}}, verbose=False,
                                     input_names=["faces"], output_names=["logits", "embeddings"])
        exported.save(temporary)
        proto = onnx.load(temporary)
        onnx.helper.set_model_props(proto, {EXPORT_METADATA: json.dumps(metadata, indent=1)})
        onnx.save(proto, temporary)
        session = onnxruntime.InferenceSession(temporary, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            for got, expected in zip(session.run(None, {"faces": example.numpy()}), deployed(example)):
                torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


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

