"""Families of candidate operations: declaration, registry, building.

A `Family` declares its parameters as data (`Param`), a builder and an
optional validity rule. A `Registry` holds families by name and refuses
duplicates. `hant.ops` keeps one registry with the built-in families; every
function here takes `registry=` to use another one instead.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from hant.errors import HantError
from hant.ops.spec import _INT_TOKEN_RE, _NAME_RE, OpSpec, Param, SpecError, parse_with

__all__ = ["Family", "Registry", "check_output_shape"]


@dataclass(frozen=True)
class Family:
    """A family of candidate operations.

    name:          the family token (`mb`, `skip`, ...).
    builder:       `builder(in_chs, out_chs, stride, **args) -> nn.Module`, where
                   `args` holds the spec's parameter values by name; families with
                   `needs_teacher` also receive `teacher_layer=`, and `sample=` (a batch
                   of the layer's input) when their builder takes it and one is given.
    params:        the parameters, in token order.
    valid:         optional `valid(in_chs, out_chs, stride, **args) -> bool`; a spec
                   that is not valid for a layer is never offered nor built for it.
                   Families with `needs_teacher` also receive `teacher_layer=` (None when
                   the caller has no teacher layer: such a family is then not offered).
    needs_teacher: the builder needs the teacher's layer (`teacher`, and families that
                   derive the candidate from it); it receives `teacher_layer=` and returns
                   a module already initialised from it.
    description:   one line for listings.
    """

    name: str
    builder: Callable[..., nn.Module]
    params: tuple[Param, ...] = ()
    valid: Callable[..., bool] | None = None
    needs_teacher: bool = False
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params))
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise SpecError(f"family name {self.name!r} must be lower-case letters and digits, starting with a letter")
        if not callable(self.builder):
            raise SpecError(f"family {self.name!r} needs a callable builder")
        names: set[str] = set()
        words: set[str] = set()  # bare tokens: flag names and choice values
        for p in self.params:
            if not isinstance(p, Param):
                raise SpecError(f"family {self.name!r}: parameters must be hant.ops.Param, got {p!r}")
            if p.name in names:
                raise SpecError(f"family {self.name!r} declares parameter {p.name!r} twice")
            names.add(p.name)
            bare = {p.name} if p.kind == "flag" else set(p.values) if p.kind == "choice" else set()
            if bare & words:
                raise SpecError(f"family {self.name!r}: token {sorted(bare & words)[0]!r} would be ambiguous")
            words |= bare
        int_keys = {p.name for p in self.params if p.kind == "int"}
        for w in words:
            m = _INT_TOKEN_RE.match(w)
            if m and m.group(1) in int_keys:
                raise SpecError(f"family {self.name!r}: token {w!r} reads as a value of {m.group(1)!r}")

    def parse(self, spec: str) -> OpSpec:
        """Parse a spec string of this family (first token must be the family name)."""
        return parse_with(spec, self.name, self.params)

    def param(self, name: str) -> Param:
        """The declared parameter `name`; SpecError if there is none."""
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise SpecError(f"family {self.name!r} has no parameter {name!r}; its parameters: {known}")

    def specs(self, restrict: Mapping[str, Iterable[Any]] | None = None) -> list[OpSpec]:
        """Every combination of the declared values, in declaration order.

        `restrict` maps parameter names to the subset of values to use (in the
        given order). SpecError names an unknown parameter or a value it does not take.
        """
        restrict = dict(restrict or {})
        choices = []
        for p in self.params:
            if p.name in restrict:
                vals = tuple(restrict.pop(p.name))
                for v in vals:
                    if v not in p.values or isinstance(v, bool) != (p.kind == "flag"):
                        raise SpecError(f"family {self.name!r}: {p.name!r} does not take {v!r}; it takes {p.allowed()}")
            else:
                vals = p.values
            choices.append([(p.name, v) for v in vals])
        if restrict:
            self.param(next(iter(restrict)))  # raises, naming the unknown parameter
        return [OpSpec(self.name, tuple(combo)) for combo in itertools.product(*choices)]

    def is_valid(self, spec: OpSpec, in_chs: int, out_chs: int, stride: int,
                 teacher_layer: nn.Module | None = None) -> bool:
        """Whether `spec` (of this family) fits a layer of this shape (and, for a family that
        derives its candidate from the teacher, that teacher layer)."""
        if self.valid is None:
            return True
        if self.needs_teacher:
            return bool(self.valid(in_chs, out_chs, stride, teacher_layer=teacher_layer, **spec.args))
        return bool(self.valid(in_chs, out_chs, stride, **spec.args))


class Registry:
    """Families by name, in registration order; duplicate names are refused."""

    def __init__(self, families: Iterable[Family] = ()):
        self._families: dict[str, Family] = {}
        for f in families:
            self.register(f)

    def register(self, family: Family) -> Family:
        """Add `family`; SpecError if a family of that name exists already."""
        if not isinstance(family, Family):
            raise SpecError(f"register a hant.ops.Family, got {type(family).__name__}")
        if family.name in self._families:
            raise SpecError(f"op family {family.name!r} is already registered; choose another name")
        self._families[family.name] = family
        return family

    def unregister(self, name: str) -> Family:
        """Remove and return family `name`; SpecError if there is none."""
        family = self.get(name)
        del self._families[name]
        return family

    def get(self, name: str) -> Family:
        """The family `name`; SpecError naming it (and the known ones) if unknown."""
        try:
            return self._families[name]
        except KeyError:
            raise SpecError(f"unknown op family {name!r}; known: {', '.join(self._families)}") from None

    def names(self) -> list[str]:
        """Registered family names, in registration order."""
        return list(self._families)

    def __contains__(self, name: object) -> bool:
        return name in self._families

    def parse(self, spec: str) -> OpSpec:
        """Parse a spec string; SpecError (a ValueError) naming the bad token."""
        if not isinstance(spec, str) or not spec:
            raise SpecError(f"a spec must be a non-empty string such as 'mb_k3_e6_se_silu', got {spec!r}")
        return self.get(spec.split("_", 1)[0]).parse(spec)

    def resolve(self, spec: str | OpSpec) -> tuple[Family, OpSpec]:
        """The family and parsed spec of a string or OpSpec (an OpSpec is re-validated)."""
        text = spec.encode() if isinstance(spec, OpSpec) else spec
        op = self.parse(text)
        return self.get(op.family), op

    def is_valid(self, spec: str | OpSpec, in_chs: int, out_chs: int, stride: int,
                 teacher_layer: nn.Module | None = None) -> bool:
        """Whether `spec` fits a layer mapping `in_chs` to `out_chs` with `stride`; families
        that derive their candidate from the teacher's layer judge it on `teacher_layer`."""
        family, op = self.resolve(spec)
        return family.is_valid(op, in_chs, out_chs, stride, teacher_layer)

    def needs_teacher(self, spec: str | OpSpec) -> bool:
        """Whether building `spec` needs the teacher's layer (`teacher_layer=` of `build`)."""
        return self.resolve(spec)[0].needs_teacher

    def build(
        self,
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
    ) -> nn.Module:
        """Build the module for `spec` at a layer's shape; see `hant.ops.build`."""
        for label, v in (("in_chs", in_chs), ("out_chs", out_chs), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{label} must be a positive int, got {v!r}")
        family, op = self.resolve(spec)
        if family.needs_teacher and teacher_layer is None:
            raise SpecError(f"spec {op.encode()!r} needs the teacher's layer; pass teacher_layer=")
        if not family.is_valid(op, in_chs, out_chs, stride, teacher_layer):
            raise SpecError(
                f"spec {op.encode()!r} does not fit a layer with in_chs={in_chs}, out_chs={out_chs}, "
                f"stride={stride}; choose one of the layer's candidates"
            )
        kwargs = op.args
        if family.needs_teacher:
            kwargs["teacher_layer"] = teacher_layer
            if sample is not None and "sample" in inspect.signature(family.builder).parameters:
                kwargs["sample"] = sample
        module = family.builder(in_chs, out_chs, stride, **kwargs)
        if not isinstance(module, nn.Module):
            raise HantError(f"builder of family {family.name!r} returned {type(module).__name__}, not an nn.Module")
        if check:
            check_output_shape(module, op.encode(), in_chs, out_chs, stride, in_hw=in_hw, out_hw=out_hw)
        return module


def check_output_shape(
    module: nn.Module,
    label: str,
    in_chs: int,
    out_chs: int,
    stride: int,
    *,
    in_hw: tuple[int, int] | None = None,
    out_hw: tuple[int, int] | None = None,
) -> None:
    """Run `module` once on a tiny zero input and check its output shape.

    Without `in_hw`, the input is `4*stride` square and the expected output 4x4;
    with `in_hw` and no `out_hw`, the expected output is `ceil(in_hw / stride)`.
    Zeros keep the global random state untouched; eval mode keeps BatchNorm
    statistics untouched. Every submodule's train/eval mode is restored.
    Raises HantError when the shape differs.
    """
    if in_hw is None:
        in_hw = (4 * stride, 4 * stride)
    if out_hw is None:
        out_hw = tuple(-(-d // stride) for d in in_hw)
    expect = (1, out_chs, *out_hw)
    modes = [(m, m.training) for m in module.modules()]
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        module.eval()
        with torch.no_grad():
            y = module(torch.zeros(1, in_chs, *in_hw, device=device, dtype=dtype))
    except Exception as e:  # the module itself is at fault; say which one and where
        raise HantError(
            f"op {label!r} failed on input {(1, in_chs, *in_hw)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        for m, training in modes:
            m.training = training
    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else None
    if shape != expect:
        raise HantError(
            f"op {label!r} gives output shape {shape} for input {(1, in_chs, *in_hw)}, expected {expect}; "
            f"fix its builder or choose another spec"
        )

