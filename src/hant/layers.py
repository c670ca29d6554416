"""Find the replaceable layers of a teacher, record their shapes, and build the preflight report.

A *layer* is a submodule that maps one feature map (N, C, H, W) to one feature map and runs
once per forward pass; each layer is replaced by one candidate operation. Default discovery:

1. timm EfficientNet/MobileNet style: a child ``blocks`` that is an ``nn.Sequential`` -> its
   blocks, ``blocks.i.j`` (stage Sequentials inside it are looked through).
2. ResNet style (timm and torchvision): children ``layer1``, ``layer2``, ... that are
   ``nn.Sequential`` -> their blocks, ``layerN.i``.
3. Anything else: the children of the model's *main sequential stages*. Every ``nn.Sequential``
   in the model is a container; its units are its children, looking through children whose
   type is exactly ``nn.Sequential`` (plain stage lists; subclasses such as torchvision's
   ``Conv2dNormActivation`` count as one unit). Containers are grouped by name with digit runs
   replaced (``stage1``, ``stage2`` -> one group). A unit is usable when it takes and returns
   one 4-D tensor, runs once, and contains a convolution. A group lying entirely inside
   another group that has at least two usable units is ignored (so the ``conv`` Sequential
   inside each torchvision MobileNetV2 block loses to ``features``); of the rest, the group
   with the most usable units wins, ties to the shallower one.

Include globs (``fnmatch`` on the dotted module name; ``*`` also crosses dots) replace the
default: the outermost modules that match become the layers, so ``blocks.*.*`` selects
``blocks.i.j`` and not their insides. Exclude globs drop layers whose name, or the name of a
module containing them, matches. A glob that matches no module is an error.

Discovery runs one forward pass in eval mode under ``torch.no_grad()`` with batch 1 and
counts FLOPs per layer with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is
two FLOPs) on the input recorded for that layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from hant.errors import HantError

__all__ = ["LayerInfo", "discover_layers", "get_layer", "set_layer", "replace_layers", "inspect_model",
           "format_inspect"]


@dataclass(frozen=True)
class LayerInfo:
    """One replaceable layer. Shapes are per image (C, H, W); ``flops`` are per image."""

    name: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    stride: int
    in_chs: int
    out_chs: int
    params: int
    flops: int

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (shapes as lists)."""
        d = dataclasses.asdict(self)
        d["in_shape"] = list(self.in_shape)
        d["out_shape"] = list(self.out_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerInfo":
        """Rebuild from ``to_dict()`` output; extra keys (e.g. ``candidates``) are ignored.

        Raises HantError naming the first missing field.
        """
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                raise HantError(f"layer entry {d.get('name', '?')!r} lacks {f.name!r}; "
                                "re-create layers.json with `hant init`")
            kw[f.name] = d[f.name]
        kw["name"] = str(kw["name"])
        kw["in_shape"] = tuple(int(v) for v in kw["in_shape"])
        kw["out_shape"] = tuple(int(v) for v in kw["out_shape"])
        for k in ("stride", "in_chs", "out_chs", "params", "flops"):
            kw[k] = int(kw[k])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Module access by dotted name


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule ``name`` (dotted, integer parts index Sequential/ModuleList).

    Raises HantError if there is no such submodule.
    """
    if not name:
        raise HantError("empty layer name; give a dotted module name such as blocks.1.0")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise HantError(f"model has no module {name!r}; list the layers with `hant inspect`") from None


def set_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the existing submodule ``name`` of ``model`` by ``module`` in place.

    Raises HantError if ``name`` does not name an existing submodule or ``module`` is not an
    nn.Module (a typo must not silently add a new attribute).
    """
    if not isinstance(module, nn.Module):
        raise HantError(f"set_layer needs an nn.Module for {name!r}, got {type(module).__name__}")
    get_layer(model, name)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # Module.__setattr__ with a Module value stores it in _modules, which is also how
    # Sequential and ModuleList hold their numbered children.
    setattr(parent, leaf, module)


def replace_layers(model: nn.Module, modules: Mapping[str, nn.Module]) -> nn.Module:
    """Put ``modules[name]`` in place of each named submodule of ``model``; return ``model``.

    The one way hant builds "the teacher with some layers replaced" (latency table, student,
    scores). It works in place, so that a caller that builds a network once (the student)
    pays for no copy; deep-copy the teacher first to keep it. Every name is checked before
    anything is replaced, so an error leaves ``model`` untouched. Raises HantError for a name
    that is not a submodule of ``model`` or a value that is not an nn.Module.
    """
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise HantError(f"layer {name!r} needs an nn.Module, got {type(module).__name__}")
        get_layer(model, name)
    for name, module in modules.items():
        set_layer(model, name, module)
    return model


# ---------------------------------------------------------------------------------------------
# Discovery


@dataclass
class _Record:
    calls: int = 0
    x: torch.Tensor | None = None
    out_shape: tuple[int, ...] | None = None
    problem: str | None = None


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, dict):
        return f"dict with keys {sorted(map(str, obj))}"
    return type(obj).__name__


def _make_hook(rec: _Record):
    def hook(module, args, kwargs, output):
        rec.calls += 1
        if rec.calls > 1:
            return None
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            what = _describe(args) if not kwargs else f"{_describe(args)} and keyword arguments"
            rec.problem = f"input is not a single tensor ({what})"
        elif not isinstance(output, torch.Tensor):
            rec.problem = f"output is not a single tensor ({_describe(output)})"
        else:
            rec.x = args[0].detach()
            rec.out_shape = tuple(output.shape)
        return None

    return hook


def _stride(in_hw: Sequence[int], out_hw: Sequence[int]) -> int | None:
    """The smallest stride s with ceil(in / s) == out on both axes (None if there is none).

    Equals in H / out H when it divides; ceil covers padded convolutions on odd sizes.
    """
    (hi, wi), (ho, wo) = in_hw, out_hw
    if ho > hi or wo > wi or ho < 1 or wo < 1:
        return None
    for s in range(1, max(hi, wi) + 1):
        if math.ceil(hi / s) == ho and math.ceil(wi / s) == wo:
            return s
    return None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _problem(rec: _Record | None, module: nn.Module, need_conv: bool) -> str | None:
    """Why a module cannot be a layer, or None if it can."""
    if rec is None or rec.calls == 0:
        return "not called in the forward pass"
    if rec.calls > 1:
        return f"called {rec.calls} times in one forward pass (a shared module is replaced once)"
    if rec.problem:
        return rec.problem
    if rec.x.dim() != 4:
        return f"input is not a 4-D feature map (shape {list(rec.x.shape)})"
    if len(rec.out_shape) != 4:
        return f"output is not a 4-D feature map (shape {list(rec.out_shape)})"
    if _stride(rec.x.shape[2:], rec.out_shape[2:]) is None:
        return (f"output size {rec.out_shape[2]}x{rec.out_shape[3]} is not its input size "
                f"{rec.x.shape[2]}x{rec.x.shape[3]} reduced by a stride")
    if need_conv and not _has_conv(module):
        return "contains no convolution"
    return None


def _units(name: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of a container, looking through plain nn.Sequential stages."""
    out = []
    for child_name, child in container._modules.items():  # named_children() hides repeats
        if child is None:
            continue
        full = f"{name}.{child_name}" if name else child_name
        if type(child) is nn.Sequential:
            out.extend(_units(full, child))
        else:
            out.append((full, child))
    return out


def _preferred_containers(model: nn.Module) -> list[str] | None:
    """Containers of the named rules (timm ``blocks``, ResNet ``layerN``), or None."""
    children = dict(model.named_children())
    if isinstance(children.get("blocks"), nn.Sequential):
        return ["blocks"]
    stages = [n for n, c in children.items() if re.fullmatch(r"layer\d+", n) and isinstance(c, nn.Sequential)]
    return stages or None


def _is_inside(name: str, outer: str) -> bool:
    """True if module ``name`` is a strict descendant of module ``outer`` ('' is the root)."""
    return name != outer and (outer == "" or name.startswith(outer + "."))


def _outermost(names: Iterable[str]) -> list[str]:
    """Drop names that lie inside another name of the list; keep the input order."""
    names = list(names)
    return [n for n in names if not any(_is_inside(n, o) for o in names)]


def _check_globs(globs: Sequence[str], module_names: list[str], flag: str) -> None:
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in module_names):
            if not module_names:
                raise HantError(f"{flag} glob {g!r}: the model has no submodules to choose from")
            # A path of nested names shows the naming scheme of this model.
            depth = min(2, max(n.count(".") for n in module_names))
            deep = next(n for n in module_names if n.count(".") == depth)
            shown = ", ".join(repr(n) for n in reversed(_self_and_ancestors(deep)))
            raise HantError(f"{flag} glob {g!r} matches no module of the model; "
                            f"module names look like {shown}")


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise HantError(f"input size must be three positive numbers C H W (e.g. 1 64 64), got {input_size!r}")
    return size


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() already de-duplicates


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        module(x)
    return int(counter.get_total_flops())


def _choose(modules: dict[str, nn.Module], records: dict[str, _Record], groups: dict[str, list[str]], watch: list[str], include: list[str]) -> tuple[list[str], bool]:
    """The modules that become layers, and whether they must contain a convolution."""
    if include:
        return watch, False  # the user chose: only the shape rules apply
    units = {k: [u for c in cs for u, _ in _units(c, modules[c])] for k, cs in groups.items()}
    count = {k: sum(_problem(records.get(u), modules[u], True) is None for u in us) for k, us in units.items()}

    def dominated(k: str) -> bool:
        # A chain of at least two usable units outranks any Sequential nested inside it.
        return any(count[o] >= 2 and all(any(_is_inside(c, oc) for oc in groups[o]) for c in groups[k])
                   for o in groups if o != k)

    live = [k for k in groups if not dominated(k)]
    if not live or max(count[k] for k in live) == 0:
        return [], True
    best = max(live, key=lambda k: (count[k], -min(c.count(".") + bool(c) for c in groups[k])))
    return units[best], True


def _describe_layers(modules: dict[str, nn.Module], records: dict[str, _Record], chosen: list[str],
                     need_conv: bool, exclude: list[str]) -> tuple[list[LayerInfo], list[dict]]:
    """LayerInfo for the usable chosen modules (FLOPs counted here), reasons for the rest."""
    layers: list[LayerInfo] = []
    skipped: list[dict] = []
    for n in chosen:
        hit = next((g for g in exclude for a in _self_and_ancestors(n) if fnmatch.fnmatchcase(a, g)), None)
        if hit is not None:
            skipped.append({"name": n, "reason": f"excluded by {hit!r}"})
            continue
        rec = records.get(n)
        problem = _problem(rec, modules[n], need_conv)
        if problem:
            skipped.append({"name": n, "reason": problem})
            continue
        c, h, w = (int(v) for v in rec.x.shape[1:])
        oc, oh, ow = (int(v) for v in rec.out_shape[1:])
        layers.append(LayerInfo(name=n, in_shape=(c, h, w), out_shape=(oc, oh, ow), stride=_stride((h, w), (oh, ow)),
                                in_chs=c, out_chs=oc, params=_param_count(modules[n]),
                                flops=_flops(modules[n], rec.x)))
    return layers, skipped


def _discover(model: nn.Module, input_size: Sequence[int], include: Sequence[str] = (),
              exclude: Sequence[str] = ()) -> tuple[list[LayerInfo], list[dict], int]:
    """discover_layers plus the FLOPs of the whole model per image."""
    from torch.utils.flop_counter import FlopCounterMode

    size = _check_input_size(input_size)
    include, exclude = list(include or ()), list(exclude or ())
    # Keep every alias of a shared module so that each name it is reached by can be looked up.
    modules = dict(model.named_modules(remove_duplicate=False))
    named = [n for n in modules if n]
    _check_globs(include, named, "--include")
    _check_globs(exclude, named, "--exclude")

    # Which modules to watch: the include matches, or every unit of every Sequential
    # (the named rules and the main-stage heuristic choose among those after the pass).
    groups: dict[str, list[str]] = {}
    if include:
        watch = _outermost(n for n in named if any(fnmatch.fnmatchcase(n, g) for g in include))
    else:
        for n, m in modules.items():
            if isinstance(m, nn.Sequential):
                groups.setdefault(re.sub(r"\d+", "#", n), []).append(n)
        preferred = _preferred_containers(model)
        if preferred:
            groups = {"preferred": preferred}
        watch = list(dict.fromkeys(u for cs in groups.values() for c in cs for u, _ in _units(c, modules[c])))

    records = {n: _Record() for n in watch}
    handles = [modules[n].register_forward_hook(_make_hook(records[n]), with_kwargs=True) for n in watch]
    modes = {m: m.training for m in model.modules()}
    total = FlopCounterMode(display=False)
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        # Batch 1 in eval mode: BatchNorm in training mode fails on 1x1 maps with batch 1.
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        model.eval()
        with torch.no_grad():
            try:
                with total:
                    model(x)
            except (RuntimeError, ValueError, IndexError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise HantError(f"model forward failed at input size {'x'.join(map(str, size))} "
                                f"({first}); check --input-size (C must match the model's input channels)") from None
            for h in handles:
                h.remove()
            chosen, need_conv = _choose(modules, records, groups, watch, include)
            layers, skipped = _describe_layers(modules, records, chosen, need_conv, exclude)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if not layers:
        why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        raise HantError("found no replaceable layers" + (f" ({why})" if why else "")
                        + "; choose them with --include GLOB (e.g. 'features.*')")
    return layers, skipped, int(total.get_total_flops())


def _self_and_ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def discover_layers(model: nn.Module, input_size: Sequence[int], include: Sequence[str] = (),
                    exclude: Sequence[str] = ()) -> tuple[list[LayerInfo], list[dict]]:
    """Find the replaceable layers of ``model`` and record their shapes, params and FLOPs.

    Runs one forward pass (eval mode, no_grad, batch 1 of ``input_size`` = (C, H, W)); the
    training flags of all modules are restored afterwards. See the module docstring for the
    default rules and the glob semantics.

    Returns ``(layers, skipped)``: LayerInfo in forward order, and ``{"name", "reason"}`` for
    each considered module that cannot be a layer (or was excluded).
    Raises HantError for a bad input size, a glob that matches no module, a forward pass
    that fails, or when no layer is left.
    """
    layers, skipped, _ = _discover(model, input_size, include, exclude)
    return layers, skipped


# ---------------------------------------------------------------------------------------------
# The `hant inspect` report


def inspect_model(source: str, input_size: Sequence[int], num_classes: int = 10, checkpoint: str | None = None,
                  trust_pickle: bool = False, space: str = "default", include: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> dict:
    """Load a teacher, discover its layers and count candidates per layer in ``space``.

    Returns the ``hant inspect --json`` dict: ``model``, ``input_size``, ``space``, ``layers``
    (LayerInfo fields plus ``candidates``), ``skipped`` ({"name", "reason"}), ``total_params``,
    ``total_flops`` (per image). Raises HantError for anything the user can fix (unknown model
    or space, bad checkpoint, bad globs or input size).
    """
    from hant.space import load_space
    from hant.teacher import load_teacher

    size = _check_input_size(input_size)
    pool = load_space(space)  # before building the model, so a bad space name fails fast
    model = load_teacher(source, in_chans=size[0], num_classes=num_classes, checkpoint=checkpoint,
                         trust_pickle=trust_pickle)
    layers, skipped, total_flops = _discover(model, size, include, exclude)
    counts: dict[tuple[int, int, int], int] = {}
    rows = []
    for layer in layers:
        key = (layer.in_chs, layer.out_chs, layer.stride)
        if key not in counts:
            counts[key] = len(pool.candidates(*key))
        rows.append({**layer.to_dict(), "candidates": counts[key]})
    return {
        "model": source,
        "input_size": list(size),
        "space": space,
        "layers": rows,
        "skipped": skipped,
        "total_params": _param_count(model),
        "total_flops": total_flops,
    }


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(v) for v in s)


def format_inspect(report: dict) -> str:
    """Render an ``inspect_model`` report as an aligned text table with skipped layers and totals."""
    head = ["layer", "in -> out", "stride", "params", "MFLOPs", "candidates"]
    rows = [[r["name"], f"{_shape(r['in_shape'])} -> {_shape(r['out_shape'])}", str(r["stride"]),
             f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}", str(r["candidates"])] for r in report["layers"]]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        # Names and shapes read left to right; numbers line up on the right.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"model {report['model']}  input {_shape(report['input_size'])}  space {report['space']}", "",
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    if report["skipped"]:
        out += ["", f"skipped ({len(report['skipped'])}):"]
        w = max(len(s["name"]) for s in report["skipped"])
        out += [f"  {s['name'].ljust(w)}  {s['reason']}" for s in report["skipped"]]
    layer_params = sum(r["params"] for r in report["layers"])
    layer_flops = sum(r["flops"] for r in report["layers"])
    n_cand = sum(r["candidates"] for r in report["layers"])
    out += ["", f"{len(report['layers'])} layers, {n_cand:,} candidates; "
                f"layers hold {layer_params:,} of {report['total_params']:,} params and "
                f"{layer_flops / 1e6:.2f} of {report['total_flops'] / 1e6:.2f} MFLOPs per image"]
    return "\n".join(out)
