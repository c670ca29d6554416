"""The families that are not blocks: `skip`, `proj` and `teacher`."""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn

from hant.ops.registry import Family


def build_skip(in_chs: int, out_chs: int, stride: int) -> nn.Identity:
    """The identity: removes the layer (only where stride is 1 and channels match)."""
    return nn.Identity()


def skip_valid(in_chs: int, out_chs: int, stride: int) -> bool:
    """Identity keeps the shape, so it fits only shape-preserving layers."""
    return stride == 1 and in_chs == out_chs


def build_proj(in_chs: int, out_chs: int, stride: int) -> nn.Sequential:
    """1x1 conv (stride) + BN: the cheapest op that changes channels and resolution."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
            bn=nn.BatchNorm2d(out_chs),
        )
    )


def build_teacher(in_chs: int, out_chs: int, stride: int, teacher_layer: nn.Module) -> nn.Module:
    """A deep copy of the teacher's layer, weights untouched; the original is never shared."""
    return copy.deepcopy(teacher_layer)


SKIP = Family("skip", build_skip, valid=skip_valid, description="identity (stride 1, same channels)")
PROJ = Family("proj", build_proj, description="1x1 conv + BN with the layer's stride")
TEACHER = Family("teacher", build_teacher, needs_teacher=True, description="the teacher's own layer")
