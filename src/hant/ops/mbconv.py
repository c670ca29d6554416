"""MBConv (`mb`): timm's InvertedResidual, the EfficientNet block."""

from __future__ import annotations

from timm.models._efficientnet_blocks import InvertedResidual

from hant.ops.common import ACT, SE, act_layer, se_layer, timm_stride
from hant.ops.registry import Family
from hant.ops.spec import Param


def build_mbconv(in_chs: int, out_chs: int, stride: int, k: int, e: int, se: bool, act: str) -> InvertedResidual:
    """1x1 expand (x e), k x k depthwise (stride), optional SE, 1x1 project; residual when shapes match."""
    return InvertedResidual(
        in_chs,
        out_chs,
        dw_kernel_size=k,
        stride=stride,
        exp_ratio=float(e),
        act_layer=act_layer(act),
        se_layer=se_layer(in_chs, se),
    )


FAMILY = Family(
    name="mb",
    builder=build_mbconv,
    params=(Param("k", "int", (1, 3, 5, 7)), Param("e", "int", (1, 2, 3, 4, 6)), SE, ACT),
    valid=timm_stride,
    description="MBConv: expand, depthwise k x k, [SE], project (e.g. mb_k5_e3_se_silu)",
)
