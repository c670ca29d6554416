"""The spec grammar: one canonical string names a candidate operation.

A spec is a family token followed by `_`-separated parameter tokens in the
family's fixed order, e.g. `mb_k5_e3_se_silu`. Each parameter is declared as
data (`Param`) so that parsing, encoding and enumerating a space all read the
same declaration:

- `int` parameters are a key followed by digits (`k5`, `e3`);
- `flag` parameters are the bare key when on and absent when off (`se`);
- `choice` parameters are the bare value (`silu`, `relu`, `hswish`).

Parsing is separate from building (see `registry.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hant.errors import HantError

__all__ = ["SpecError", "Param", "OpSpec", "parse_with"]

_KINDS = ("int", "flag", "choice")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")
# No leading zeros: `k03` would not round-trip to itself.
_INT_TOKEN_RE = re.compile(r"^([a-z]+)(0|[1-9]\d*)$")


class SpecError(HantError, ValueError):
    """A spec string or family declaration is malformed.

    Both a `HantError` (the CLI prints it as one line) and a `ValueError`
    (the contract of `parse`).
    """


@dataclass(frozen=True)
class Param:
    """One parameter of a family: how it is spelled and which values it takes.

    name:   key of the parameter (`k`, `e`, `se`, `act`); for `int` and `flag`
            it is also the token's spelling.
    kind:   `int` (token `<name><digits>`), `flag` (token `<name>` when on) or
            `choice` (token is the value itself).
    values: the allowed values, in the order a space enumerates them. For a
            flag, `(False, True)` unless given.
    """

    name: str
    kind: str
    values: tuple = ()

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise SpecError(f"parameter name {self.name!r} must be lower-case letters and digits, starting with a letter")
        if self.kind not in _KINDS:
            raise SpecError(f"parameter {self.name!r} has kind {self.kind!r}; use one of {', '.join(_KINDS)}")
        values = tuple(self.values)
        if self.kind == "flag":
            values = values or (False, True)
            if any(not isinstance(v, bool) for v in values):
                raise SpecError(f"flag parameter {self.name!r} takes only True/False values")
        elif self.kind == "int":
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise SpecError(f"int parameter {self.name!r} needs a non-empty tuple of non-negative ints")
            if not re.match(r"^[a-z]+$", self.name):
                raise SpecError(f"int parameter name {self.name!r} must be letters only (digits would be ambiguous)")
        else:
            if not values or any(not isinstance(v, str) or not _NAME_RE.match(v) for v in values):
                raise SpecError(f"choice parameter {self.name!r} needs lower-case alphanumeric string values")
        if len(set(values)) != len(values):
            raise SpecError(f"parameter {self.name!r} lists a value twice: {values}")
        object.__setattr__(self, "values", values)

    def token(self, value: Any) -> str | None:
        """The token that spells `value`, or None when it is omitted (flag off)."""
        if self.kind == "int":
            return f"{self.name}{value}"
        if self.kind == "flag":
            return self.name if value else None
        return value

    def allowed(self) -> str:
        """The allowed values as a short human-readable list."""
        if self.kind == "int":
            return ", ".join(f"{self.name}{v}" for v in self.values)
        if self.kind == "flag":
            return f"{self.name} or nothing"
        return ", ".join(self.values)


@dataclass(frozen=True)
class OpSpec:
    """A parsed spec: the family and its parameter values in the family's order.

    `params` is a tuple of `(name, value)` pairs; `args` gives them as a dict.
    Obtain one with `hant.ops.parse`; `encode()` gives back the canonical string.
    """

    family: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def args(self) -> dict[str, Any]:
        """Parameter values by name (what the family's builder receives)."""
        return dict(self.params)

    def get(self, name: str, default: Any = None) -> Any:
        """The value of parameter `name`, or `default`."""
        return self.args.get(name, default)

    def encode(self) -> str:
        """The canonical spec string; `parse(s).encode() == s` for canonical `s`."""
        tokens = [self.family]
        for name, value in self.params:
            if isinstance(value, bool):
                if value:
                    tokens.append(name)
            elif isinstance(value, int):
                tokens.append(f"{name}{value}")
            else:
                tokens.append(str(value))
        return "_".join(tokens)

    def __str__(self) -> str:
        return self.encode()


def parse_with(spec: str, family: str, params: tuple[Param, ...]) -> OpSpec:
    """Parse the tokens of `spec` (whose first token is `family`) against `params`.

    Raises SpecError (a ValueError) naming the first unknown, duplicated,
    out-of-order or badly valued token, or the missing parameter.
    """
    tokens = spec.split("_")[1:]
    values: dict[str, Any] = {}
    last_index = -1
    for tok in tokens:
        if tok == "":
            raise SpecError(f"empty token in spec {spec!r}; separate tokens with a single '_'")
        index, param, value = _match(tok, params)
        if param is None:
            raise SpecError(
                f"unknown token {tok!r} in spec {spec!r}; family {family!r} takes, in order: "
                f"{_describe(params) or 'no parameters'}"
            )
        if param.name in values:
            raise SpecError(f"duplicated token {tok!r} in spec {spec!r}; give {param.name!r} once")
        if index < last_index:
            raise SpecError(
                f"token {tok!r} is out of order in spec {spec!r}; family {family!r} takes, in order: {_describe(params)}"
            )
        if value not in param.values:
            raise SpecError(
                f"bad value in token {tok!r} of spec {spec!r}; {param.name!r} takes {param.allowed()}"
            )
        values[param.name] = value
        last_index = index
    out = []
    for p in params:
        if p.name in values:
            out.append((p.name, values[p.name]))
        elif p.kind == "flag":
            out.append((p.name, False))
        else:
            raise SpecError(f"spec {spec!r} is missing parameter {p.name!r} ({p.allowed()})")
    return OpSpec(family, tuple(out))


def _match(tok: str, params: tuple[Param, ...]) -> tuple[int, Param | None, Any]:
    for i, p in enumerate(params):
        if p.kind == "flag" and tok == p.name:
            return i, p, True
        if p.kind == "choice" and tok in p.values:
            return i, p, tok
    m = _INT_TOKEN_RE.match(tok)
    if m:
        for i, p in enumerate(params):
            if p.kind == "int" and p.name == m.group(1):
                return i, p, int(m.group(2))
    return -1, None, None


def _describe(params: tuple[Param, ...]) -> str:
    parts = []
    for p in params:
        if p.kind == "int":
            parts.append(f"{p.name}<{'|'.join(str(v) for v in p.values)}>")
        elif p.kind == "flag":
            parts.append(f"[{p.name}]")
        else:
            parts.append("|".join(p.values))
    return " ".join(parts)
