"""A model plug-in for scripts/rule_study.py: a network that is not one of ours, brought in
as `model=study_models:mlp`, the way a user brings their own."""
from torch import nn


def mlp(num_classes: int, image_size: int) -> nn.Module:
    """A plain three-layer perceptron on the flattened image (no convolutions): a different
    loss landscape from the CNNs, and quick on a CPU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * image_size * image_size, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, num_classes))
