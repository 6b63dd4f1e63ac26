"""The backbones beyond the paper's ResNets: every torchvision architecture stage 3 offers, and timm's, takes its
ImageNet weights file and gives the student's two heads; a ConvNeXt-Tiny student trains on the embedded default, with
TensorBoard logs, and stage 4 evaluates and exports it."""

import json
import os

import pytest
import torch
import torchvision

import stage3_student
import stage4_eval
from ngd_ext import artifacts
from ngd_ext.student_model import ARCHITECTURES, Student, load_backbone_weights
from test_stage3 import TINY

timm = pytest.importorskip("timm")


def imagenet_weights(arch):
    """An ImageNet-shaped state_dict of the architecture (3-channel stem, 1000-way classifier, 224 px), as its
    weights file holds one; random here, nothing is downloaded."""
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        return timm.create_model(arch[len("timm:"):], pretrained=False).state_dict()
    return getattr(torchvision.models, arch)(weights=None).state_dict()


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "timm:resnet18"])
def test_each_backbone_loads_its_imagenet_weights_and_gives_both_heads(arch, tmp_path):
    path = str(tmp_path / "imagenet.pth")
    weights = imagenet_weights(arch)
    torch.save(weights, path)
    student = Student(arch, 8, 16, input_size=48)
    load_backbone_weights(student, path)
    loaded = student.backbone.state_dict()
    stem = next(key for key, value in loaded.items() if value.dim() == 4 and value.shape[1] == 1)
    torch.testing.assert_close(loaded[stem], weights[stem].sum(dim=1, keepdim=True))  # RGB summed to grey
    others = [key for key in loaded if key != stem and "pos_embedding" not in key]
    assert all(torch.equal(loaded[key], weights[key]) for key in others)
    if arch == "vit_b_16":  # 224 px: 14 x 14 patches and the class token; 48 px: 3 x 3 and the class token
        assert weights["encoder.pos_embedding"].shape[1] == 197 and loaded["encoder.pos_embedding"].shape[1] == 10
    logits, embeddings = student.eval()(torch.randn(2, 1, 48, 48))
    assert logits.shape == (2, 8) and embeddings.shape == (2, 16) and torch.isfinite(logits).all()


@pytest.mark.parametrize("flags, message", [
    (["--arch", "vgg16"], "--arch vgg16: 'vgg16' is not one of convnext_tiny, efficientnet_b0, mobilenet_v3_large, "
                          "resnet18, resnet50, vit_b_16, nor timm:NAME"),
    (["--arch", "vit_b_16", "--input-size", "56"], "--arch vit_b_16: vit_b_16 cuts its input into 16-pixel patches: "
                                                   "give an --input-size that is a multiple"),
])
def test_a_backbone_that_cannot_serve_is_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B0", *flags])
    assert message in capsys.readouterr().err


def test_timm_backbones_need_timm(monkeypatch, capsys):
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *rest: None if name == "timm" else real(name, *rest))
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B0", "--arch", "timm:resnet18"])
    assert "--arch timm:resnet18: timm:resnet18 needs timm (pip install timm)" in capsys.readouterr().err


def test_a_convnext_student_trains_logs_and_is_evaluated_and_exported(run_with_bank, tmp_path, capsys):
    run_dir = run_with_bank
    stage3_student.main(["--run-dir", run_dir, "--variant", "B3", "--kd-weight", "0", "--arch", "convnext_tiny",
                         "--name", "convnext", "--tensorboard", *TINY])
    out = os.path.join(run_dir, "stage3", "convnext")
    assert set(artifacts.read_manifest(out)) == {"best.pt", "last.pt", "history.jsonl", "curves.png", "config.json"}
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert last["config"]["arch"] == "convnext_tiny" and last["epoch"] == 1
    logs = os.listdir(os.path.join(run_dir, "tensorboard", "convnext"))
    assert len(logs) == 1 and logs[0].startswith("events.out.tfevents.")
    stage4_eval.main(["--run-dir", run_dir, "--variants", "convnext", "--synthetic-size", "tiny", "--tsne-points",
                      "40", "--bootstrap", "100", "--device", "cpu"])
    with open(os.path.join(run_dir, "stage4", "summary.json")) as handle:
        assert "convnext" in json.dumps(json.load(handle))
    export = str(tmp_path / "convnext.pt2")
    stage4_eval.main(["--run-dir", run_dir, "--variants", "convnext", "--export", export])
    assert sorted(os.listdir(tmp_path)) == ["convnext.onnx", "convnext.pt2"]
