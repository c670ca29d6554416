"""Conv-BN-act (`conv`): timm's ConvBnAct, one dense k x k convolution."""

from __future__ import annotations

from timm.models._efficientnet_blocks import ConvBnAct

from hant.ops.common import ACT, act_layer, timm_stride
from hant.ops.registry import Family
from hant.ops.spec import Param


def build_conv(in_chs: int, out_chs: int, stride: int, k: int, act: str) -> ConvBnAct:
    """k x k conv (stride), BN, activation; residual when shapes match."""
    return ConvBnAct(in_chs, out_chs, k, stride=stride, skip=True, act_layer=act_layer(act))


FAMILY = Family(
    name="conv",
    builder=build_conv,
    params=(Param("k", "int", (1, 3, 5)), ACT),
    valid=timm_stride,
    description="conv-bn-act: one dense k x k conv (e.g. conv_k3_relu)",
)
