"""Fused MBConv (`fmb`): timm's EdgeResidual, the EfficientNet-V2 early block."""

from __future__ import annotations

from timm.models._efficientnet_blocks import EdgeResidual

from hant.ops.common import ACT, SE, act_layer, se_layer, timm_stride
from hant.ops.registry import Family
from hant.ops.spec import Param


def build_fused(in_chs: int, out_chs: int, stride: int, k: int, e: int, se: bool, act: str) -> EdgeResidual:
    """k x k expand conv (x e, stride), optional SE, 1x1 project; residual when shapes match."""
    return EdgeResidual(
        in_chs,
        out_chs,
        exp_kernel_size=k,
        stride=stride,
        exp_ratio=float(e),
        act_layer=act_layer(act),
        se_layer=se_layer(in_chs, se),
    )


FAMILY = Family(
    name="fmb",
    builder=build_fused,
    params=(Param("k", "int", (3, 5, 7)), Param("e", "int", (1, 2, 3, 4)), SE, ACT),
    valid=timm_stride,
    description="fused MBConv: k x k expand, [SE], project (e.g. fmb_k3_e4_relu)",
)
