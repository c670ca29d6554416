"""Pieces shared by the built-in families: the activation and SE parameters."""

from __future__ import annotations

from functools import partial

from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import SqueezeExcite

from hant.ops.spec import Param

# Spec spelling -> timm activation name. Hard-swish and SiLU export to ONNX
# (HardSwish from opset 14, SiLU as Sigmoid*Mul).
ACTS = {"silu": "silu", "relu": "relu", "hswish": "hard_swish"}

ACT = Param("act", "choice", tuple(ACTS))
SE = Param("se", "flag")


def act_layer(name: str):
    """The activation class for a spec's `act` value."""
    return get_act_layer(ACTS[name])


def se_layer(in_chs: int, se: bool):
    """An SE factory as timm's blocks expect it, or None when `se` is off.

    As in EfficientNet, the squeeze width is a quarter of the block's input
    channels, whatever the expansion (timm's `se_from_exp=False` setting).
    """
    if not se:
        return None
    return partial(SqueezeExcite, rd_channels=max(1, round(in_chs * 0.25)))


def timm_stride(in_chs: int, out_chs: int, stride: int, **_) -> bool:
    """Whether timm's blocks give the right output size at `stride`.

    They pad a strided convolution with ((stride - 1) + (k - 1)) // 2, which is "same"
    padding for strides 1 and 2 only: a 3x3 at stride 4 turns 16x16 into 5x5, not 4x4. Layers
    with a larger stride (patchify stems, a 4x4 map reduced to 1x1) get the other families.
    """
    return stride <= 2
