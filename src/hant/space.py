"""Candidate pools: which specs each layer may choose from.

A space is data: a YAML file with a `candidates` list whose items are either a
spec string (`mb_k3_e6_se_silu`) or a family with optional value subsets

    - family: mb          # every declared value of every parameter ...
      k: [3, 5]           # ... except where restricted here
      se: [false, true]

Built-in spaces live in `hant/spaces/*.yaml`: `full` (every combination,
240 for a stride-1 layer with equal channels), `default` (about 30) and
`tiny` (about 6). `Space.candidates(in_chs, out_chs, stride)` filters the
pool to the specs that fit one layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from hant.errors import HantError
from hant.ops import REGISTRY, Registry, SpecError

__all__ = ["Space", "load_space", "list_spaces", "space_from_dict"]

# Every pool offers these: `teacher` keeps the layer as it is and `proj` fits any shape,
# so the selection always has a feasible, and a cheapest, choice for every layer.
ALWAYS = ("teacher", "proj")
_KEYS = ("name", "description", "candidates")


@dataclass(frozen=True)
class Space:
    """A named pool of candidate specs (canonical strings, no duplicates, fixed order)."""

    name: str
    specs: tuple[str, ...]
    description: str = ""
    source: str = ""
    registry: Registry = field(default=REGISTRY, repr=False, compare=False)

    def candidates(self, in_chs: int, out_chs: int, stride: int, teacher_layer: nn.Module | None = None) -> list[str]:
        """The specs that fit a layer mapping in_chs -> out_chs with `stride`, in pool order.

        Always includes `teacher` and `proj`; `skip` only for stride 1 with equal channels.
        Families derived from the teacher's layer (`self_w50`, `sep`, ...) are offered only
        with `teacher_layer`, and only where they fit it.
        """
        for label, v in (("in_chs", in_chs), ("out_chs", out_chs), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HantError(f"{label} must be a positive int, got {v!r}")
        return [s for s in self.specs if self.registry.is_valid(s, in_chs, out_chs, stride, teacher_layer)]

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)


def _space_dir():
    return resources.files("hant") / "spaces"


def list_spaces() -> list[str]:
    """Names of the built-in spaces, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _space_dir().iterdir() if p.name.endswith(".yaml"))


def load_space(name_or_path: str | os.PathLike, *, registry: Registry | None = None) -> Space:
    """Load a built-in space by name (`full`, `default`, `tiny`) or a space YAML file.

    Raises HantError for an unknown name (listing the known ones), a missing
    file, or a file that names an unknown family, parameter or token.
    """
    text = os.fspath(name_or_path)
    known = list_spaces()
    if text in known:
        res = _space_dir() / f"{text}.yaml"
        source, raw = f"built-in space {text!r}", res.read_text(encoding="utf-8")
        default_name = text
    else:
        path = Path(text)
        if not path.is_file():
            if path.suffix in (".yaml", ".yml") or os.sep in text:
                raise HantError(f"space file {text} not found; pass an existing YAML file or one of: {', '.join(known)}")
            raise HantError(f"unknown space {text!r}; use one of {', '.join(known)} or a path to a space YAML file")
        source, raw = f"space file {text}", path.read_text(encoding="utf-8")
        default_name = path.stem
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise HantError(f"{source} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    return space_from_dict(data, default_name=default_name, source=source, registry=registry)


def space_from_dict(
    data: Any, *, default_name: str = "custom", source: str = "space", registry: Registry | None = None
) -> Space:
    """Build a Space from the parsed YAML mapping (see the module docstring for the format).

    Raises HantError naming the offending key, family, parameter or token.
    """
    reg = REGISTRY if registry is None else registry
    if not isinstance(data, dict):
        raise HantError(f"{source} must be a mapping with a 'candidates' list")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise HantError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")
    items = data.get("candidates")
    if not isinstance(items, list) or not items:
        raise HantError(f"{source}: 'candidates' must be a non-empty list of specs or family entries")
    specs: dict[str, None] = {}  # insertion-ordered set
    for i, item in enumerate(items):
        try:
            for s in _expand(item, reg):
                specs.setdefault(s, None)
        except SpecError as e:
            raise HantError(f"{source}, candidate {i + 1}: {e}") from None
    missing = [s for s in ALWAYS if s not in specs]
    ordered = tuple(missing) + tuple(specs)
    return Space(
        name=str(data.get("name") or default_name),
        specs=ordered,
        description=str(data.get("description") or ""),
        source=source,
        registry=reg,
    )


def _expand(item: Any, reg: Registry) -> list[str]:
    if isinstance(item, str):
        op = reg.parse(item)
        if op.encode() != item:  # parse is strict, so this only guards odd inputs
            raise SpecError(f"spec {item!r} is not canonical; write {op.encode()!r}")
        return [item]
    if isinstance(item, dict):
        if "family" not in item:
            raise SpecError(f"entry {item!r} needs a 'family' key (or write a spec string)")
        family = reg.get(item["family"])
        restrict = {}
        for key, val in item.items():
            if key == "family":
                continue
            restrict[key] = val if isinstance(val, list) else [val]
        return [op.encode() for op in family.specs(restrict)]
    raise SpecError(f"entry {item!r} must be a spec string or a mapping with 'family'")
