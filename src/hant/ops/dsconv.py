"""Depthwise-separable conv (`ds`): timm's DepthwiseSeparableConv (MobileNet-V1 / EfficientNet stage 1)."""

from __future__ import annotations

from timm.models._efficientnet_blocks import DepthwiseSeparableConv

from hant.ops.common import ACT, SE, act_layer, se_layer, timm_stride
from hant.ops.registry import Family
from hant.ops.spec import Param


def build_dsconv(in_chs: int, out_chs: int, stride: int, k: int, se: bool, act: str) -> DepthwiseSeparableConv:
    """k x k depthwise (stride), optional SE, 1x1 pointwise; residual when shapes match."""
    return DepthwiseSeparableConv(
        in_chs,
        out_chs,
        dw_kernel_size=k,
        stride=stride,
        act_layer=act_layer(act),
        se_layer=se_layer(in_chs, se),
    )


FAMILY = Family(
    name="ds",
    builder=build_dsconv,
    params=(Param("k", "int", (3, 5, 7)), SE, ACT),
    valid=timm_stride,
    description="depthwise-separable: depthwise k x k, [SE], pointwise (e.g. ds_k3_se_hswish)",
)
