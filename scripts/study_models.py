"""Models for scripts/rule_study.py, written as a user would write their own (nothing here is
clr_mlflow's): a plain MLP (also the CLI's model plug-in `model=study_models:mlp`), a small
ResNet for CIFAR, a character-level transformer LM, a tabular MLP regressor and a small conv
encoder-decoder for segmentation. Every layer with weights has `reset_parameters()` (torch's
own layers), so lr_find's seeds > 0 re-initialise them all."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(num_classes: int, image_size: int) -> nn.Module:
    """A plain three-layer perceptron on the flattened image (no convolutions): a different
    loss landscape from the CNNs, and quick on a CPU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * image_size * image_size, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, num_classes))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """He et al.'s basic residual block: two 3x3 conv-BN, a 1x1 conv-BN shortcut when the
    shape changes, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), _conv_bn(cout, cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


def tiny_resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A ResNet-8 for 32x32 images (He et al.'s CIFAR layout, one block per stage): a 3x3 stem,
    three stages of width 16/32/64 at 32/16/8 pixels, global pooling, linear. ~78k weights."""
    return nn.Sequential(
        _conv_bn(3, width), nn.ReLU(inplace=True),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


class _Block(nn.Module):
    """A pre-LayerNorm transformer block with causal self-attention."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.ff(self.ln2(x))


class CharLM(nn.Module):
    """A GPT-style character LM: token + learned position embeddings, `layers` pre-LN
    blocks, final LayerNorm, linear head. Input (B, T) ints, output (B, T, vocab) logits."""

    def __init__(self, vocab: int, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def regressor(features: int = 10, hidden: int = 128) -> nn.Module:
    """A two-hidden-layer ReLU MLP with one output, for tabular regression."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class SegNet(nn.Module):
    """A small U-Net-like encoder-decoder: conv-BN-ReLU at 32, 16 and 8 pixels (16/32/64
    channels), transposed convs back up with skip connections, a 1x1 head of `classes`."""

    def __init__(self, classes: int = 4, w: int = 16):
        super().__init__()
        block = lambda cin, cout, s=1: nn.Sequential(_conv_bn(cin, cout, s), nn.ReLU(inplace=True))  # noqa: E731
        self.e1, self.e2, self.e3 = block(3, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2)
        self.u2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), block(4 * w, 2 * w)
        self.u1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, 2), block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(a)
        c = self.e3(b)
        b = self.d2(torch.cat([self.u2(c), b], 1))
        return self.head(self.d1(torch.cat([self.u1(b), a], 1)))
