"""ResNet blocks: basic (`basic`) and bottleneck (`bottle`).

timm's BasicBlock/Bottleneck fix the kernel at 3 and take the output width as
`planes * expansion` with a prebuilt downsample; a candidate needs any kernel
and any (in_chs, out_chs), so these are small blocks of the same structure
(ResNet v1.5: stride on the k x k conv, projection shortcut when shapes differ).
"""

from __future__ import annotations

from torch import nn

from hant.ops.common import ACT, act_layer
from hant.ops.registry import Family
from hant.ops.spec import Param


def _conv_bn(in_chs: int, out_chs: int, k: int, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_chs, out_chs, k, stride=stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(out_chs)


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    conv, bn = _conv_bn(in_chs, out_chs, 1, stride)
    return nn.Sequential(conv, bn)


class BasicBlock(nn.Module):
    """Two k x k convs with BN; the first carries the stride; add shortcut, then act."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, act_layer=nn.ReLU):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_chs, out_chs, kernel_size, stride)
        self.act1 = act_layer(inplace=True)
        self.conv2, self.bn2 = _conv_bn(out_chs, out_chs, kernel_size)
        self.downsample = _shortcut(in_chs, out_chs, stride)
        self.act2 = act_layer(inplace=True)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce to out_chs/e, k x k (stride), 1x1 expand to out_chs; add shortcut, then act."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, exp_ratio: int = 4, act_layer=nn.ReLU
    ):
        super().__init__()
        mid_chs = max(1, out_chs // exp_ratio)
        self.conv1, self.bn1 = _conv_bn(in_chs, mid_chs, 1)
        self.act1 = act_layer(inplace=True)
        self.conv2, self.bn2 = _conv_bn(mid_chs, mid_chs, kernel_size, stride)
        self.act2 = act_layer(inplace=True)
        self.conv3, self.bn3 = _conv_bn(mid_chs, out_chs, 1)
        self.downsample = _shortcut(in_chs, out_chs, stride)
        self.act3 = act_layer(inplace=True)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


def build_basic(in_chs: int, out_chs: int, stride: int, k: int, act: str) -> BasicBlock:
    """ResNet basic block with k x k kernels."""
    return BasicBlock(in_chs, out_chs, kernel_size=k, stride=stride, act_layer=act_layer(act))


def build_bottleneck(in_chs: int, out_chs: int, stride: int, k: int, e: int, act: str) -> Bottleneck:
    """ResNet bottleneck block; `e` is the ratio of out_chs to the inner width (4 in ResNet-50)."""
    return Bottleneck(in_chs, out_chs, kernel_size=k, stride=stride, exp_ratio=e, act_layer=act_layer(act))


BASIC = Family(
    name="basic",
    builder=build_basic,
    params=(Param("k", "int", (3, 5)), ACT),
    description="ResNet basic block: two k x k convs + shortcut (e.g. basic_k3_relu)",
)

BOTTLENECK = Family(
    name="bottle",
    builder=build_bottleneck,
    params=(Param("k", "int", (3, 5)), Param("e", "int", (2, 4)), ACT),
    description="ResNet bottleneck: 1x1 reduce by e, k x k, 1x1 expand + shortcut (e.g. bottle_k3_e4_relu)",
)
