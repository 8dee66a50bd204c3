"""Models by name: a small CNN that trains quickly on a CPU, and ResNet-18 for CIFAR."""
from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv-BN-ReLU blocks (32, 64, 128 channels), each halving the resolution, then
    global average pooling and a linear layer: ~94k weights, a few ms per batch on a CPU."""
    return nn.Sequential(
        _conv_bn(3, 32), nn.MaxPool2d(2),
        _conv_bn(32, 64), nn.MaxPool2d(2),
        _conv_bn(64, 128), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no
    max-pool, so 32x32 inputs keep their resolution into the first stage."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = {"small_cnn": small_cnn, "resnet18": resnet18_cifar}


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"Expected model in {sorted(MODELS)}, but got {name!r}")
    return MODELS[name](num_classes)
