"""The student network and loading local weights."""

import pytest
import torch
import torchvision

from ngd_ext.student_model import Student, load_backbone_weights


@pytest.mark.parametrize("arch,size", [("resnet18", 48), ("resnet18", 64), ("resnet50", 48)])
def test_outputs(arch, size):
    model = Student(arch, embedding_size=25).eval()
    logits, embedding = model(torch.randn(3, 1, size, size))
    assert logits.shape == (3, 8) and embedding.shape == (3, 25)


def test_loads_torchvision_weights_with_a_module_prefix(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save({f"module.{key}": value for key, value in source.state_dict().items()}, path)
    model = Student("resnet18")
    load_backbone_weights(model, str(path))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].bn2.weight, source.layer4[1].bn2.weight)


def test_loads_a_student_checkpoint(tmp_path):
    source = Student("resnet18")
    path = tmp_path / "best.pt"
    torch.save({"state_dict": source.state_dict(), "config": {"arch": "resnet18"}}, path)
    model = Student("resnet18")
    load_backbone_weights(model, str(path))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)


def test_refuses_another_architecture(tmp_path):
    path = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet50.pt: does not fit this backbone: .*another architecture"):
        load_backbone_weights(Student("resnet18"), str(path))
