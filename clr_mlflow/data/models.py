"""Models by name: a small CNN that trains quickly on a CPU, and ResNet-18 for CIFAR."""
from __future__ import annotations

import math

from torch import nn


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def small_cnn(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """Three conv-BN-ReLU blocks (32, 64, 128 channels), each halving the resolution, then
    global average pooling and a linear layer: ~94k weights, a few ms per batch on a CPU."""
    return nn.Sequential(
        _conv_bn(3, 32), nn.MaxPool2d(2),
        _conv_bn(32, 64), nn.MaxPool2d(2),
        _conv_bn(64, 128), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


def resnet18_cifar(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no
    max-pool, so 32x32 inputs keep their resolution into the first stage."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class WithinChannelLRN(nn.Module):
    """Caffe's LRN with norm_region WITHIN_CHANNEL: x / (1 + alpha * mean_{k x k}(x^2))**beta,
    the mean over a k x k spatial neighbourhood of each channel (zero-padded)."""

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x):
        mean_sq = nn.functional.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1 + self.alpha * mean_sq) ** self.beta


def _caffe_pool(size: int) -> int:
    return math.ceil((size - 3) / 2) + 1


def smith_cifar(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """The CLR paper's CIFAR-10 network, Caffe's `cifar10_full` example: conv5x5(32) - maxpool
    3/2 - ReLU - LRN - conv5x5(32) - ReLU - avgpool 3/2 - LRN - conv5x5(64) - ReLU - avgpool
    3/2 - linear. Pooling rounds up as Caffe's does (32 -> 16 -> 8 -> 4), so the linear layer
    sees 64 x 4 x 4. Initialisation is PyTorch's default, not Caffe's Gaussians."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True), WithinChannelLRN(),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True), WithinChannelLRN(),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * _caffe_pool(_caffe_pool(_caffe_pool(image_size))) ** 2, num_classes),
    )


class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def fast_net(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """A ResNet-9-style network for short, large-lr schedules: four conv-BN-ReLU stages
    (64, 128, 256, 512 channels) with a residual pair after the 2nd and 4th, max-pool
    between stages, global max-pool, and a linear head scaled by 1/8 so early logits stay
    small at the high learning rates one-cycle reaches. 6.6M weights."""
    return nn.Sequential(
        _conv_bn(3, 64),
        _conv_bn(64, 128), nn.MaxPool2d(2), _Residual(_conv_bn(128, 128), _conv_bn(128, 128)),
        _conv_bn(128, 256), nn.MaxPool2d(2),
        _conv_bn(256, 512), nn.MaxPool2d(2), _Residual(_conv_bn(512, 512), _conv_bn(512, 512)),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes, bias=False), _Scale(0.125),
    )


MODELS = {"small_cnn": small_cnn, "resnet18": resnet18_cifar, "smith_cifar": smith_cifar, "fast": fast_net}


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """One of MODELS, or a user's `module.path:callable(num_classes, image_size)`."""
    from clr_mlflow.data import plugins

    if plugins.is_plugin(name):
        return plugins.build_model(name, num_classes, image_size)
    if name not in MODELS:
        raise ValueError(f"Expected model in {sorted(MODELS)}, but got {name!r}")
    return MODELS[name](num_classes, image_size)
