"""Find the replaceable layers of a teacher, record their shapes, and build the preflight report.

A *layer* is a submodule that maps one feature map (N, C, H, W) to one feature map and runs
once per forward pass; each layer is replaced by one candidate operation. A module is *usable*
as a layer when it takes and returns one 4-D tensor, runs once, its output size is its input
size reduced by a stride, and it contains a convolution.

Default discovery finds blocks, not stages, whatever the classes or names. It walks down from
the model; the children of a module it opens are *units*:

1. Plain containers (exactly ``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) and
   modules that were not called themselves while their parts ran are opened.
2. A *stage* is opened: a usable unit that only runs its children one after another (each
   takes the previous one's output, unchanged; the last one's output is its own; a residual
   sum, a concatenation or a gate breaks this) and holds a *block* with wiring of its own.
   A block holds two or more convolutions or linear layers and a normalisation layer, so a
   multi-kernel or separable convolution or a squeeze-excite gate is not one. So the blocks
   of timm's RegNet stages (``s1.b1``, ``s1.b2``) and ConvNeXt stages
   (``stages.0.blocks.0``) are found as those of an ``nn.Sequential`` stage are.
3. A usable unit that would hold more than 1/8 of the model's FLOPs and holds two blocks,
   one with wiring of its own (a CSP stage, a DLA tree, a DenseNet dense block), or, in a
   network of four layers or more, more than 1/4 of them in any case (VoVNet's first
   block), is opened when that gives at least two layers holding 90% of its FLOPs. Any
   other usable unit is a layer.
4. A unit that cannot be a layer but holds two or more convolutions or linear layers is
   opened: its parts may be layers (DLA tree nodes and DPN blocks take two tensors, DenseNet
   layers a list; HRNet modules return one map per branch).
5. The model's own children with at most one convolution or linear layer are its stem, head
   and classifier and are not units (``conv1`` of a ResNet, ``conv_stem`` of an
   EfficientNet), unless blocks (not stages: blocks of blocks) hang from the model itself
   (Inception, Xception): then those that run before its last block are. In a model made
   of such children only (a plain list of convolutions) every child is a unit.

The skipped list gives the reason for each unit that cannot be a layer and holds a
convolution or linear layer (in a model that is itself a plain container: for each unit
reached through plain containers), except inside a container where nothing is usable (a
classifier, a list of one shared module).

Include globs (``fnmatch`` on the dotted module name; ``*`` also crosses dots) replace the
default: the outermost modules that match become the layers, so ``blocks.*.*`` selects
``blocks.i.j`` and not their insides. Exclude globs drop layers whose name, or the name of a
module containing them, matches. A glob that matches no module is an error.

Discovery runs one forward pass in eval mode under ``torch.no_grad()`` with batch 1, with
hooks on every module, and counts the FLOPs of each module (its submodules included) in that
pass with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is two FLOPs). A
forward pass that fails, for example because the model does not accept the input size, is
reported in one line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

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

# A layer that would hold more than this share of the model's FLOPs is split into its parts
# when at least two of them are blocks of their own (a stage) ...
_SPLIT_STAGE = 1 / 8
# ... and, in a network of _SPLIT_ANY_LAYERS layers or more, one holding more than this share
# whenever its parts can be layers ...
_SPLIT_ANY = 1 / 4
_SPLIT_ANY_LAYERS = 4
# ... provided that those parts hold at least this share of its FLOPs.
_SPLIT_COVER = 0.9
# Containers without logic of their own: their children run one by one.
_PLAIN = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class _Record:
    """What the forward pass showed about one module; shapes and FLOPs are of its first call."""

    calls: int = 0
    order: int = 0
    # The tensors themselves and their version counters (which in-place ops bump) tell
    # whether a module's children ran one after another (see _Pass.is_chain).
    x: torch.Tensor | None = None
    x_version: int = 0
    y: torch.Tensor | None = None
    y_version: int = 0
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    problem: str | None = None
    flops: int = 0  # including its submodules
    start: int = 0  # the pass's FLOP count when its first call began


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, dict):
        return f"dict with keys {sorted(map(str, obj))}"
    return type(obj).__name__


def _make_hooks(rec: _Record, counter, clock: list[int]):
    """Forward pre- and post-hooks that fill ``rec``; ``clock`` numbers first calls in order."""

    def pre(module, args, kwargs):
        rec.calls += 1
        if rec.calls == 1:
            rec.order = clock[0]
            clock[0] += 1
            rec.start = counter.get_total_flops()
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
                rec.x, rec.x_version = args[0], args[0]._version
        return None

    def post(module, args, kwargs, output):
        if rec.calls > 1:
            return None
        rec.flops = counter.get_total_flops() - rec.start
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            what = _describe(args) if not kwargs else f"{_describe(args)} and keyword arguments"
            rec.problem = f"input is not a single tensor ({what})"
        elif not isinstance(output, torch.Tensor):
            rec.problem = f"output is not a single tensor ({_describe(output)})"
        else:
            rec.in_shape = tuple(args[0].shape)
            rec.out_shape = tuple(output.shape)
            rec.y, rec.y_version = output, output._version
        return None

    return pre, post


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
    if len(rec.in_shape) != 4:
        return f"input is not a 4-D feature map (shape {list(rec.in_shape)})"
    if len(rec.out_shape) != 4:
        return f"output is not a 4-D feature map (shape {list(rec.out_shape)})"
    if _stride(rec.in_shape[2:], rec.out_shape[2:]) is None:
        return (f"output size {rec.out_shape[2]}x{rec.out_shape[3]} is not its input size "
                f"{rec.in_shape[2]}x{rec.in_shape[3]} reduced by a stride")
    if need_conv and not _has_conv(module):
        return "contains no convolution"
    return None


def _join(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


@dataclass
class _Pass:
    """One recorded forward pass, as the choice of layers reads it."""

    records: dict[nn.Module, _Record]
    total_flops: int
    split_any: bool = False  # split any layer over _SPLIT_ANY, not only stages
    weighted: dict[nn.Module, int] = dataclasses.field(default_factory=dict)
    normed: dict[nn.Module, bool] = dataclasses.field(default_factory=dict)
    ran: dict[nn.Module, bool] = dataclasses.field(default_factory=dict)

    def n_weighted(self, module: nn.Module) -> int:
        """Convolutions and linear layers inside ``module`` (itself included)."""
        if module not in self.weighted:
            own = isinstance(module, _WEIGHTED)
            self.weighted[module] = own + sum(self.n_weighted(c) for c in module.children())
        return self.weighted[module]

    def has_norm(self, module: nn.Module) -> bool:
        """Whether ``module`` is or holds a normalisation layer."""
        if module not in self.normed:
            self.normed[module] = isinstance(module, _NORM) or any(self.has_norm(c) for c in module.children())
        return self.normed[module]

    def is_block(self, module: nn.Module) -> bool:
        """Two or more convolutions or linear layers and a normalisation layer: a block, and
        not one (multi-kernel or separable) convolution nor a squeeze-excite gate."""
        return self.n_weighted(module) >= 2 and self.has_norm(module)

    def holds_blocks(self, module: nn.Module, least: int) -> bool:
        """At least ``least`` blocks among the units of ``module``, one of them with wiring of
        its own (not ``is_chain``: a residual sum, a concatenation): what a stage holds."""
        blocks = [u for u in _units(module) if self.is_block(u)]
        return len(blocks) >= least and any(not self.is_chain(b) for b in blocks)

    def is_chain(self, module: nn.Module) -> bool:
        """Whether ``module`` only runs its children one after another: each called child
        takes the previous one's output (the first the module's input), unchanged, and the
        last one's output is the module's. A residual sum, a concatenation or a gate breaks
        the chain."""
        rec = self.records.get(module)
        kids = sorted((self.records[c] for c in module.children() if self.records[c].calls),
                      key=lambda r: r.order)
        if rec is None or rec.y is None or not kids or any(k.calls > 1 for k in kids):
            return False
        x, version = rec.x, rec.x_version
        for k in kids:
            if k.x is not x or k.x_version != version or k.y is None:
                return False
            x, version = k.y, k.y_version
        return rec.y is x and rec.y_version == version

    def has_run(self, module: nn.Module) -> bool:
        """Whether ``module`` or any module inside it was called."""
        if module not in self.ran:
            rec = self.records.get(module)
            self.ran[module] = bool(rec and rec.calls) or any(self.has_run(c) for c in module.children())
        return self.ran[module]


def _children(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    # _modules, not named_children(): that one hides a module registered twice.
    return [(_join(name, n), c) for n, c in module._modules.items() if c is not None]


def _units(module: nn.Module) -> list[nn.Module]:
    """The children of ``module``, looking through plain containers."""
    units, stack = [], [module]
    while stack:
        for _, c in reversed(_children(stack.pop(), "")):
            (stack if type(c) in _PLAIN else units).append(c)
    return units


def _open(name: str, module: nn.Module, run: _Pass, listed: bool,
          keep: Callable[[nn.Module], bool] | None = None) -> tuple[list[str], list[dict]]:
    """The layers inside ``module`` (its children, or those ``keep`` accepts, taken as
    units), and the units skipped."""
    layers: list[str] = []
    skipped: list[dict] = []
    for child_name, child in _children(module, name):
        if keep is None or keep(child):
            found, why = _unit(child_name, child, run, listed)
            layers += found
            skipped += why
    return layers, skipped


def _unit(name: str, module: nn.Module, run: _Pass, listed: bool) -> tuple[list[str], list[dict]]:
    """The layers a unit gives (itself, or what lies inside it) and what is skipped.

    ``listed``: the model is a plain container and the unit is reached from it through plain
    containers only, so every unit is one the user listed; there, units without
    convolutions are reported too.
    """
    rec = run.records.get(module)
    if type(module) in _PLAIN or not (rec and rec.calls) and run.has_run(module):
        layers, skipped = _open(name, module, run, listed)
        # A container with no layer at all (a classifier, a shared module's list) is not
        # part of the network's body: nothing of it is reported.
        return (layers, skipped) if layers else ([], [])
    problem = _problem(rec, module, need_conv=True)
    if problem is None and run.is_chain(module) and run.holds_blocks(module, 1):
        # A stage of any class (RegNet's, ConvNeXt's): it runs its blocks one after another.
        layers, skipped = _open(name, module, run, listed=False)
        if layers:
            return layers, skipped
    if problem is None:
        if rec.flops > _SPLIT_STAGE * run.total_flops:
            parts = _split(name, module, run)
            if parts is not None:
                return parts
        return [name], []
    if run.n_weighted(module) >= 2 and run.has_run(module):
        # Its parts may still be layers: DLA tree nodes and DPN blocks take two tensors,
        # DenseNet layers a list, HRNet modules return one map per branch.
        layers, skipped = _open(name, module, run, listed=False)
        if layers:
            return layers, skipped
    report = run.n_weighted(module) > 0 or (listed and run.has_run(module))
    return [], ([{"name": name, "reason": problem}] if report else [])


def _split(name: str, module: nn.Module, run: _Pass) -> tuple[list[str], list[dict]] | None:
    """The layers inside a large layer, or None when it should stay whole.

    Above ``_SPLIT_STAGE`` it is split when it holds blocks (``_Pass.holds_blocks``), so
    that the parts are blocks and not the convolutions of one block; above ``_SPLIT_ANY``
    in any case when ``run.split_any``. Either way the parts must hold ``_SPLIT_COVER`` of
    its FLOPs.
    """
    flops = run.records[module].flops
    if (not run.split_any or flops <= _SPLIT_ANY * run.total_flops) and not run.holds_blocks(module, 2):
        return None
    layers, skipped = _open(name, module, run, listed=False)
    inside = dict(module.named_modules(prefix=name, remove_duplicate=False))
    covered = sum(run.records[inside[n]].flops for n in layers)
    if len(layers) < 2 or covered < _SPLIT_COVER * flops:
        return None
    return layers, skipped


def _default_layers(model: nn.Module, run: _Pass) -> tuple[list[str], list[dict]]:
    """The default rules (module docstring): layers in forward order, and skipped units."""
    children = [c for _, c in _children(model, "")]
    if all(run.n_weighted(c) <= 1 for c in children):
        keep = None  # a plain list of convolutions: each is a unit
    else:
        # The model's own children with one convolution or linear layer at most are its stem
        # and head, not layers; but where its blocks hang from it directly (Inception,
        # Xception), those that run before its last block are units like the rest. A stage
        # (a block of blocks) hanging from it does not count.
        blocks = [run.records[c].order for c in children
                  if type(c) not in _PLAIN and run.records[c].calls and run.is_block(c)
                  and not any(run.is_block(u) for u in _units(c))]
        last = max(blocks, default=-1)

        def keep(child: nn.Module) -> bool:
            rec = run.records[child]
            return run.n_weighted(child) > 1 or (rec.calls > 0 and rec.order < last)

    listed = type(model) in _PLAIN
    layers, skipped = _open("", model, run, listed, keep)
    if len(layers) >= _SPLIT_ANY_LAYERS:
        run.split_any = True
        layers, skipped = _open("", model, run, listed, keep)
    modules = dict(model.named_modules(remove_duplicate=False))
    layers.sort(key=lambda n: run.records[modules[n]].order)
    return layers, skipped


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


def _describe_layers(modules: dict[str, nn.Module], records: dict[nn.Module, _Record], chosen: list[str],
                     need_conv: bool, exclude: list[str]) -> tuple[list[LayerInfo], list[dict]]:
    """LayerInfo for the usable chosen modules, reasons for the rest."""
    layers: list[LayerInfo] = []
    skipped: list[dict] = []
    for n in chosen:
        hit = next((g for g in exclude for a in _self_and_ancestors(n) if fnmatch.fnmatchcase(a, g)), None)
        if hit is not None:
            skipped.append({"name": n, "reason": f"excluded by {hit!r}"})
            continue
        rec = records.get(modules[n])
        problem = _problem(rec, modules[n], need_conv)
        if problem:
            skipped.append({"name": n, "reason": problem})
            continue
        c, h, w = (int(v) for v in rec.in_shape[1:])
        oc, oh, ow = (int(v) for v in rec.out_shape[1:])
        layers.append(LayerInfo(name=n, in_shape=(c, h, w), out_shape=(oc, oh, ow), stride=_stride((h, w), (oh, ow)),
                                in_chs=c, out_chs=oc, params=_param_count(modules[n]), flops=int(rec.flops)))
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

    # Every module is watched: the rules need the calls, shapes and FLOPs of all of them.
    total = FlopCounterMode(display=False)
    records = {m: _Record() for m in modules.values()}
    clock = [0]
    handles = []
    for m, rec in records.items():
        pre, post = _make_hooks(rec, total, clock)
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
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
            except Exception as e:  # a model may reject a size in any way (assert, shape checks)
                first = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
                raise HantError(f"{type(model).__name__} forward failed at input size {'x'.join(map(str, size))} "
                                f"({type(e).__name__}: {first}); check --input-size (C must match the model's "
                                "input channels; H and W must be a size the model accepts)") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if include:
        chosen = _outermost(n for n in named if any(fnmatch.fnmatchcase(n, g) for g in include))
        skipped: list[dict] = []
    else:
        run = _Pass(records, int(total.get_total_flops()))
        chosen, skipped = _default_layers(model, run)
    layers, unusable = _describe_layers(modules, records, chosen, not include, exclude)
    skipped = unusable + skipped
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
    rows = []
    for layer in layers:
        # Per layer, not per shape: the families derived from the teacher's layer depend on it.
        n = len(pool.candidates(layer.in_chs, layer.out_chs, layer.stride, get_layer(model, layer.name)))
        rows.append({**layer.to_dict(), "candidates": n})
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
