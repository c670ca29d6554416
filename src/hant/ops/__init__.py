"""Candidate operations: the spec grammar, the family registry, building.

    >>> from hant import ops
    >>> ops.parse("mb_k5_e3_se_silu").encode()
    'mb_k5_e3_se_silu'
    >>> m = ops.build("mb_k3_e6_relu", in_chs=16, out_chs=24, stride=2)

Built-in families: mb, fmb, ds, conv, basic, bottle, skip, proj, teacher, and the families
derived from the teacher's layer: self (its own block at reduced width), sep, lr, sp, grp
(its convolutions factorised).
Register your own with `register_family`. Every function takes `registry=` to
work on another `Registry` than the built-in one.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from hant.ops import conv, dsconv, factor, fused, mbconv, resnet, selfw, simple
from hant.ops.registry import Family, Registry, check_output_shape
from hant.ops.spec import OpSpec, Param, SpecError

__all__ = [
    "OpSpec",
    "Param",
    "Family",
    "Registry",
    "SpecError",
    "REGISTRY",
    "builtin_families",
    "parse",
    "build",
    "is_valid",
    "needs_teacher",
    "count_params",
    "register_family",
    "unregister_family",
    "get_family",
    "families",
    "derived_families",
    "check_output_shape",
]


def builtin_families() -> list[Family]:
    """The families hant ships, in the order spaces list them."""
    return [
        mbconv.FAMILY,
        fused.FAMILY,
        dsconv.FAMILY,
        conv.FAMILY,
        resnet.BASIC,
        resnet.BOTTLENECK,
        simple.SKIP,
        simple.PROJ,
        simple.TEACHER,
        selfw.FAMILY,
        *factor.FAMILIES,
    ]


# The registry the module-level functions use; users extend it with register_family.
REGISTRY = Registry(builtin_families())


def _reg(registry: Registry | None) -> Registry:
    return REGISTRY if registry is None else registry


def parse(spec: str, *, registry: Registry | None = None) -> OpSpec:
    """Parse a spec string such as `mb_k5_e3_se_silu` into an OpSpec.

    Raises SpecError (a ValueError and a HantError) naming the unknown family,
    or the unknown, duplicated, out-of-order or badly valued token.
    """
    return _reg(registry).parse(spec)


def build(
    spec: str | OpSpec,
    in_chs: int,
    out_chs: int,
    stride: int,
    teacher_layer: nn.Module | None = None,
    *,
    in_hw: tuple[int, int] | None = None,
    out_hw: tuple[int, int] | None = None,
    check: bool = True,
    sample: torch.Tensor | None = None,
    registry: Registry | None = None,
) -> nn.Module:
    """Build the module that `spec` names for a layer mapping in_chs -> out_chs with `stride`.

    The module is freshly initialised from the global torch RNG (so the same
    seed gives the same weights) and in training mode; `teacher` returns a deep
    copy of `teacher_layer`. With `check` (the default) the module is run once
    on a tiny zero input (`in_hw`, default 4*stride square) and its output must
    be `(out_chs, *out_hw)` (default ceil(in_hw / stride)).

    Raises SpecError for a bad spec, a spec that does not fit the shape (e.g.
    `skip` with stride 2) or a missing `teacher_layer`; HantError when the
    built module's output shape is wrong. `sample`, a batch of the layer's input, lets a
    family derived from the teacher's layer choose from data (`self` keeps the channels
    that matter on it); the module's structure never depends on it.
    """
    return _reg(registry).build(
        spec, in_chs, out_chs, stride, teacher_layer, in_hw=in_hw, out_hw=out_hw, check=check, sample=sample
    )


def is_valid(spec: str | OpSpec, in_chs: int, out_chs: int, stride: int, *,
             teacher_layer: nn.Module | None = None, registry: Registry | None = None) -> bool:
    """Whether `spec` fits a layer mapping in_chs -> out_chs with `stride`.

    False, for example, for `skip` unless stride is 1 and the channels match. Families
    that derive their candidate from the teacher's layer (`self`, the factorisations) judge
    it on `teacher_layer` and are never valid without one. Raises SpecError when `spec`
    itself is malformed.
    """
    return _reg(registry).is_valid(spec, in_chs, out_chs, stride, teacher_layer)


def needs_teacher(spec: str | OpSpec, *, registry: Registry | None = None) -> bool:
    """Whether building `spec` needs the teacher's layer (pass it as `teacher_layer=`)."""
    return _reg(registry).needs_teacher(spec)


def count_params(
    spec: str | OpSpec,
    in_chs: int,
    out_chs: int,
    stride: int,
    teacher_layer: nn.Module | None = None,
    *,
    registry: Registry | None = None,
) -> int:
    """Number of parameters of the op, without allocating or initialising its weights.

    The op is built on the `meta` device (shapes only), so this is cheap even
    for the largest candidates. Raises as `build` does for a bad spec.
    """
    with torch.device("meta"):
        module = build(spec, in_chs, out_chs, stride, teacher_layer, check=False, registry=registry)
    return sum(p.numel() for p in module.parameters())


def register_family(
    family: Family | str,
    builder: Callable[..., nn.Module] | None = None,
    params: Iterable[Param] = (),
    *,
    valid: Callable[..., bool] | None = None,
    needs_teacher: bool = False,
    description: str = "",
    registry: Registry | None = None,
) -> Family:
    """Register an op family so that its specs parse, build and can appear in spaces.

    Pass a `Family`, or its parts: `register_family("gc", build_gc,
    [Param("k", "int", (3, 5)), Param("act", "choice", ("relu", "silu"))])`
    where `build_gc(in_chs, out_chs, stride, k, act) -> nn.Module`.
    Returns the registered Family. Raises SpecError for a duplicate name or
    an ambiguous declaration.
    """
    if not isinstance(family, Family):
        if builder is None:
            raise SpecError(f"register_family({family!r}, ...) needs a builder function")
        family = Family(family, builder, tuple(params), valid=valid, needs_teacher=needs_teacher, description=description)
    elif builder is not None or tuple(params) or valid is not None or needs_teacher or description:
        raise SpecError("pass either a Family or its parts to register_family, not both")
    return _reg(registry).register(family)


def unregister_family(name: str, *, registry: Registry | None = None) -> Family:
    """Remove a family by name (e.g. one a test registered); returns it."""
    return _reg(registry).unregister(name)


def get_family(name: str, *, registry: Registry | None = None) -> Family:
    """The family `name`; SpecError naming it if unknown."""
    return _reg(registry).get(name)


def derived_families(*, registry: Registry | None = None) -> list[str]:
    """Families whose candidate is derived from the teacher's layer (`self`, `sep`, ...): those
    that need it, other than `teacher`, the layer itself."""
    reg = _reg(registry)
    return [n for n in reg.names() if reg.get(n).needs_teacher and n != "teacher"]


def families(*, registry: Registry | None = None) -> list[str]:
    """Registered family names, built-ins first, in registration order."""
    return _reg(registry).names()
