"""The `self` family: the teacher's own layer, thinner inside, started from its weights.

`self_w<W>` is a copy of the teacher's layer in which every internal channel group keeps
W% of its channels; `k3` also centre-crops every kernel larger than 3 to 3x3. The block's
input and output channels never change, so the candidate fits the layer it replaces.
Nothing here knows a block class: the same steps handle timm's InvertedResidual,
EdgeResidual and DepthwiseSeparable, ResNet basic and bottleneck blocks (timm and
torchvision), RegNet, ConvNeXt and MobileNetV3 blocks, or a Sequential of Conv-BN-ReLU.

1. Trace. A copy of the layer runs once on an example input (`8 * stride` square) and
   Torch-Pruning's `DependencyGraph` records which channel dimensions are coupled: a
   conv's output channels, the batch norm after it, a depthwise conv (whose input and
   output channels are the same), an SE gate that multiplies them, and the input
   channels of every layer that reads them form one group. The example input is
   registered with the graph as a parameter, so the block's input channels are a node of
   it too.
2. Internal groups. A group is internal when none of its members is the block's input
   or writes the block's output: a group that reaches a residual add, a downsample path
   or the last conv is left alone. Every internal group is pruned; there is one per
   expansion, per bottleneck width, per SE reduction, per ConvNeXt MLP.
3. How many. A group of n channels keeps round(W/100 * n), at least 1. Groups of 64
   channels or more (a multiple of 8) keep a multiple of 8, which accelerators run
   faster; below that the steps of 8 would merge neighbouring widths. Channels that a
   grouped conv or a GroupNorm splits into G groups keep the same number in every group
   (a multiple of G), at the same positions, so the grouped conv stays a grouped conv
   with G groups.
4. Which. A channel matters as much as it adds to what the layers reading it compute:
   how strongly it is written times how strongly it is read. Read: the L2 norm of its
   input column in each conv or linear that reads it (their squares add over several
   readers). Written: a norm rescales whatever was written before it, so only the last
   norm on the path counts, by the RMS of its output on the data its statistics describe,
   sqrt(gamma^2 + beta^2), times the L2 norm of the filters that write the channel after
   it (a depthwise conv after the last BN); a group without a norm uses its writers'
   filter norms (bias included). Layers that run on pooled tensors (an SE's squeeze and
   gate) are left out: their weights say little of what a channel adds to the output.
   A channel switched off anywhere on its path (gamma = beta = 0, a zero filter) is
   dropped first. In channel-split groups importance is averaged over the G groups.
   Given a batch of the layer's real input (`thin_layer(..., sample=)`), "written" is
   measured instead: each channel's RMS where each layer reads it.
   The kept channels keep their order and the teacher's weights and norm statistics.
   Measured on a trained EfficientNet-B0 (Fashion-MNIST, 32 px), mean over its 16 blocks
   of the output error (MSE / variance of the teacher block's output, real inputs):
   at w50, 0.25 (0.12 with a sample of 256 images), against 0.30 for random channels and
   0.35 for the product of every layer's weight magnitudes (filters, columns, SE and BN
   scales; what magnitude pruning ranks by); at w25 0.41 (0.25) against 0.47, at w75
   0.11 (0.04) against 0.15.
5. Kernels (`k3`). A conv whose kernel side is odd and larger than 3 is centre-cropped to
   3 along that side. Static padding drops by dilation * (k - 3) / 2 so the output shape
   is unchanged; padding computed from the kernel (padding="same", timm's Conv2dSame)
   is kept. Each crop is checked by running the conv at two input sizes; a conv whose
   output shape would change (no padding to give up) keeps its kernel.

Structure depends on shapes alone: which groups exist and how many channels each keeps
come from the trace, never from weight values, so a student rebuilt from a randomly
initialised teacher loads the saved weights of one built from the trained teacher.
Under `torch.device("meta")` (how `count_params` builds) the copy is made on meta
without copying any weight, and channels are kept by position.

A layer Torch-Pruning cannot trace, or whose pruned copy does not run or changes its
output shape, is not valid for `w < 100`; `valid_self` says so once per layer (the
analysis is memoised per teacher layer) and the candidate is never offered.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _reverse_repeat_tuple

from hant.errors import HantError
from hant.ops.registry import Family
from hant.ops.spec import Param, SpecError
from hant.teacher_init import INIT_PARTIAL, INIT_TEACHER

__all__ = ["FAMILY", "build_self", "valid_self", "kept_channels", "internal_groups", "thin_layer"]

# Groups this wide or wider keep a multiple of 8 channels (and are multiples of 8 themselves).
_ROUND8_FROM = 64
# A kernel side is cropped to this.
_SMALL_KERNEL = 3
# Widths in percent of the teacher's.
_W = (25, 50, 75, 100)
# Convs that convolve with their raw weight, so a crop of an all-zero border is exact.
_RAW_WEIGHT_CONVS: tuple[type, ...]
try:
    from timm.layers import Conv2dSame

    _RAW_WEIGHT_CONVS = (nn.Conv2d, Conv2dSame)
except ImportError:  # timm is a dependency; only its class list is optional here
    _RAW_WEIGHT_CONVS = (nn.Conv2d,)


@dataclass(frozen=True)
class ChannelGroup:
    """An internal channel group of a layer.

    root:     qualified name of the first conv or linear (in module order) writing the channels.
    channels: its number of channels.
    split:    the number of groups a grouped conv or GroupNorm splits them into (1 if none).
    members:  `name:in` / `name:out` for every layer dimension in the group, for reports.
    """

    root: str
    channels: int
    split: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Analysis:
    groups: tuple[ChannelGroup, ...]  # internal groups whose pruned copy runs
    crops: tuple[str, ...]  # convs whose kernel can be cropped to 3
    out_chs: int


def kept_channels(channels: int, w: int, split: int = 1) -> int:
    """How many of a group's `channels` `self_w<w>` keeps: round(w/100 * channels), at least
    one, a multiple of `split` (the groups a grouped conv splits them into), and a multiple
    of 8 for groups of 64 channels or more that are multiples of 8; never more than
    `channels`."""
    if split > 1:
        unit = split
    elif channels >= _ROUND8_FROM and channels % 8 == 0:
        unit = 8
    else:
        unit = 1
    # floor(x + 0.5), not round(): Python rounds halves to even, which would merge widths.
    k = unit * max(1, math.floor(w * channels / (100 * unit) + 0.5))
    return min(k, channels)


# --- copying and tracing -------------------------------------------------------------------


def _tp():
    """Torch-Pruning, imported on use so that `import hant.ops` does not need it."""
    try:
        import torch_pruning
    except ImportError as e:
        raise HantError("the `self` op family needs Torch-Pruning; install it with `pip install torch-pruning`") from e
    return torch_pruning


def _on_meta() -> bool:
    # The default device set by `with torch.device(...)`; torch.get_default_device needs 2.3.
    return torch.empty(()).device.type == "meta"


def _first_param(layer: nn.Module) -> torch.Tensor | None:
    return next(itertools.chain(layer.parameters(), layer.buffers()), None)


def _copy(layer: nn.Module, meta: bool) -> nn.Module:
    """A deep copy of `layer`; on meta, without copying any weight (the memo maps every
    parameter and buffer to an empty meta tensor of its shape)."""
    if not meta:
        return copy.deepcopy(layer)
    memo: dict[int, Any] = {}
    for t in itertools.chain(layer.parameters(), layer.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(layer, memo)


@dataclass
class _Trace:
    graph: Any  # torch_pruning.DependencyGraph of the copy
    example: torch.Tensor
    out_shape: tuple[int, ...]
    conv_hw: dict[nn.Module, tuple[int, int]]  # spatial size each Conv2d saw
    order: dict[nn.Module, int]  # when each module first ran
    context: set[nn.Module]  # convs and linears that ran on pooled (1x1) tensors: SE and the like
    groups: list[tuple[ChannelGroup, nn.Module]]  # internal groups and their root modules
    act_rms: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # measured, per input channel


def _trace(layer: nn.Module, in_chs: int, stride: int) -> _Trace:
    """Trace `layer` (a copy: its parameters are made trainable and it is set to eval) and
    find its internal channel groups. Raises whatever tracing raises."""
    tp = _tp()
    ref = _first_param(layer)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    for p in layer.parameters():
        p.requires_grad_(True)  # a frozen teacher's copy would leave nothing to trace
    size = 8 * stride
    # The input needs a gradient so that it is a node of the graph: groups that would
    # change the block's input channels then contain it.
    x = torch.zeros(1, in_chs, size, size, device=device, dtype=dtype, requires_grad=True)
    outs: list[Any] = []
    conv_hw: dict[nn.Module, tuple[int, int]] = {}
    order: dict[nn.Module, int] = {}
    context: set[nn.Module] = set()

    def record(module, args):
        order.setdefault(module, len(order))
        a = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if a is None:
            return
        if isinstance(module, nn.Conv2d) and a.dim() == 4:
            conv_hw.setdefault(module, tuple(a.shape[-2:]))
        spatial = a.shape[2:] if isinstance(module, nn.modules.conv._ConvNd) else a.shape[1:-1]
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and math.prod(spatial) == 1:
            context.add(module)

    hooks = [m.register_forward_pre_hook(record) for m in layer.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unwrapped-parameter notices: expected here
            graph = tp.DependencyGraph().build_dependency(
                layer,
                example_inputs=x,
                forward_fn=lambda model, inputs: model(inputs),
                output_transform=lambda out: outs.append(out) or out,
                unwrapped_parameters=[tp._helpers.UnwrappedParameters(parameters=x, pruning_dim=1)],
                verbose=False,
            )
    finally:
        for h in hooks:
            h.remove()
    out = outs[0] if outs else None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.grad_fn is None:
        raise ValueError("the layer does not map a 4-D tensor to a 4-D tensor through its parameters")
    return _Trace(graph, x, tuple(out.shape), conv_hw, order, context, _internal(graph, layer, x, out))


def _split(graph, group) -> int | None:
    """The number of channel groups a group's grouped convs and GroupNorms impose (1 if
    none), or None when they cannot all be kept grouped."""
    splits = set()
    n = len(group[0].idxs)
    for item in group:
        m = item.dep.target.module
        g = 1
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            if m.groups == m.out_channels:
                # Torch-Pruning treats it as depthwise, which is right only when in == out.
                if m.in_channels != m.out_channels:
                    return None
                continue
            g = m.groups
        elif isinstance(m, nn.GroupNorm):
            g = m.num_groups
        if g > 1:
            # The same positions in every group only stay so through an identity mapping.
            if list(item.idxs) != list(item.root_idxs):
                return None
            splits.add(g)
    split = max(splits, default=1)
    if any(split % g for g in splits) or n % split:
        return None
    return split


def _internal(graph, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[tuple[ChannelGroup, nn.Module]]:
    """The groups that neither touch the block's input nor write its output."""
    names = {m: n for n, m in layer.named_modules()}
    order = {m: i for i, m in enumerate(names)}
    out_node = next((node for node in graph.module2node.values() if node.grad_fn is out.grad_fn), None)
    in_node = graph.module2node.get(x)
    found = []
    roots = (nn.modules.conv._ConvNd, nn.Linear)
    for group in graph.get_all_groups(root_module_types=roots):
        boundary = False
        for item in group:
            target = item.dep.target
            if target is in_node or (target is out_node and graph.is_out_channel_pruning_fn(item.dep.handler)):
                boundary = True
                break
        if boundary:
            continue
        split = _split(graph, group)
        if split is None:
            continue
        root = group[0].dep.target.module
        members, writers = [], []
        for item in group:
            m = item.dep.target.module
            if isinstance(m, nn.Module) and m in names:
                writes = graph.is_out_channel_pruning_fn(item.dep.handler)
                members.append(f"{names[m] or '.'}:{'out' if writes else 'in'}")
                if writes and isinstance(m, roots):
                    writers.append(m)
        # Named after its first writer in module order (the expansion conv, not the SE's).
        first = min(writers, key=lambda m: order[m], default=root)
        found.append((ChannelGroup(names[first], len(group[0].idxs), split, tuple(members)), root))
    return found


# --- importance and pruning ----------------------------------------------------------------


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _idx(item, t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(item.idxs), dtype=torch.long, device=t.device)


def _row_norm(m: nn.Module, item, with_bias: bool) -> torch.Tensor:
    """L2 norm of the filters (rows) that write the item's channels, with the bias as one
    more tap when `with_bias` (the output's RMS for a white unit input)."""
    w = m.weight.detach()
    sq = w.flatten(1).pow(2).sum(1) if isinstance(m, nn.modules.conv._ConvNd) else w.pow(2).sum(1)
    if with_bias and getattr(m, "bias", None) is not None:
        sq = sq + m.bias.detach().pow(2)
    return sq.sqrt()[_idx(item, sq)]


def _column_norm(m: nn.Module, item) -> torch.Tensor:
    """L2 norm of the weights that read each of the item's input channels."""
    w = m.weight.detach()
    if isinstance(m, nn.Linear):
        return w.norm(dim=0)[_idx(item, w)]
    groups = m.groups
    # Input channel c = g * in_per_group + j is read by group g's output filters, tap j.
    per = w.view(groups, w.shape[0] // groups, w.shape[1], -1).norm(dim=(1, 3)).flatten()
    return per[_idx(item, per)]


def _norm_rms(m: nn.Module, item) -> torch.Tensor | None:
    """RMS of a norm's output channels on the data its statistics describe: sqrt(gamma^2 +
    beta^2) (unit variance in, scaled and shifted); None without an affine transform."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if w is None or w.dim() != 1:
        return None
    sq = w.detach().pow(2) + (b.detach().pow(2) if b is not None else 0)
    return sq.sqrt()[_idx(item, sq)]


def _importance(trace: _Trace, group, n: int) -> torch.Tensor:
    """Log importance of a group's n root channels: how strongly each is written times how
    strongly it is read (see the module docstring)."""
    graph = trace.graph
    # Bookkeeping on the CPU whatever the default device (meta while count_params builds).
    score = torch.zeros(n, dtype=torch.float64, device="cpu")
    # Layers on pooled tensors (SE) gate or summarise the channels; their weights say little
    # of what a channel adds to the output. Groups of such layers alone have only them.
    layers = [it for it in group if isinstance(it.dep.target.module, (nn.modules.conv._ConvNd, nn.Linear, *_NORMS))]
    items = [it for it in layers if it.dep.target.module not in trace.context] or layers

    def add(item, strength: torch.Tensor | None) -> None:
        if strength is None or strength.is_meta or strength.numel() == 0:
            return
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long, device="cpu")
        # A channel switched off anywhere on its path is dropped first (log 0 -> very low).
        score.index_add_(0, root, strength.double().cpu().clamp_min(1e-30).log())

    writes = [it for it in items if graph.is_out_channel_pruning_fn(it.dep.handler)]
    reads = [it for it in items if not graph.is_out_channel_pruning_fn(it.dep.handler)
             and isinstance(it.dep.target.module, (nn.modules.conv._ConvNd, nn.Linear))]
    read_sq = None
    measured = False
    for it in reads:
        m = it.dep.target.module
        if getattr(m, "transposed", False) or m.weight.is_meta:
            continue
        col = _column_norm(m, it)
        rms = trace.act_rms.get(m)
        if rms is not None:
            col, measured = col * rms.to(col.device)[_idx(it, col)], True
        # Channels read by several layers contribute to each: their squares add.
        sq = torch.zeros(n, dtype=torch.float64, device="cpu")
        sq.index_add_(0, torch.as_tensor(list(it.root_idxs), dtype=torch.long, device="cpu"), col.double().cpu().pow(2))
        read_sq = sq if read_sq is None else read_sq + sq
    if read_sq is not None:
        score += 0.5 * read_sq.clamp_min(1e-60).log()
    if measured:
        return score  # the measured input of each reader already says how strongly it is written
    # A norm rescales what was written before it: only the last norm on the path and the
    # layers after it set how strongly a channel arrives where it is read.
    norms = [it for it in writes if isinstance(it.dep.target.module, _NORMS)]
    last = max(norms, key=lambda it: trace.order.get(it.dep.target.module, -1), default=None)
    after = trace.order.get(last.dep.target.module, -1) if last is not None else -1
    for it in writes:
        m = it.dep.target.module
        if it is last:
            add(it, _norm_rms(m, it))
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not getattr(m, "transposed", False):
            if last is None or trace.order.get(m, -1) > after:
                add(it, _row_norm(m, it, with_bias=last is None))
    return score


def _select(score: torch.Tensor, keep: int, split: int) -> list[int]:
    """The `keep` channels to keep, in order: the same positions in each of `split` groups,
    by importance averaged over the groups (ties and meta weights: the first ones)."""
    n = score.numel()
    per = n // split
    mean = score.view(split, per).mean(0)
    best = torch.sort(-mean, stable=True).indices[: keep // split].sort().values
    return (torch.arange(split, device="cpu")[:, None] * per + best[None, :]).flatten().tolist()


def _prune(trace: _Trace, w: int) -> int:
    """Prune every internal group of the traced copy to `kept_channels`; returns how many
    groups lost channels."""
    graph = trace.graph
    plans = []
    # Choose every group's channels before pruning any, so each choice sees the teacher's weights.
    for info, root in trace.groups:
        keep = kept_channels(info.channels, w, info.split)
        if keep >= info.channels:
            continue
        fn = graph.get_pruner_of_module(root).prune_out_channels
        full = graph.get_pruning_group(root, fn, list(range(info.channels)))
        kept = set(_select(_importance(trace, full, info.channels), keep, info.split))
        plans.append((root, fn, [i for i in range(info.channels) if i not in kept]))
    for root, fn, drop in plans:
        graph.get_pruning_group(root, fn, drop).prune(record_history=False)
    return len(plans)


# --- kernel crop -----------------------------------------------------------------------------


def _crop_sides(conv: nn.Module) -> list[int]:
    if not isinstance(conv, nn.Conv2d) or conv.transposed:
        return []
    return [i for i, k in enumerate(conv.kernel_size) if k > _SMALL_KERNEL and k % 2 == 1]


def _set_padding(conv: nn.Conv2d, padding) -> None:
    conv.padding = padding
    # Used for non-zero padding modes; torch derives it from the padding in __init__.
    if isinstance(padding, str):
        pads = [0, 0] * len(conv.kernel_size)
        if padding == "same":
            for d, k, i in zip(conv.dilation, conv.kernel_size, range(len(conv.kernel_size) - 1, -1, -1)):
                total = d * (k - 1)
                pads[2 * i] = total // 2
                pads[2 * i + 1] = total - total // 2
        conv._reversed_padding_repeated_twice = pads
    else:
        conv._reversed_padding_repeated_twice = _reverse_repeat_tuple(padding, 2)


@torch.no_grad()
def _out_hw(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, ...] | None:
    w = conv.weight
    try:
        return tuple(conv(torch.zeros(1, conv.in_channels, *hw, device=w.device, dtype=w.dtype)).shape)
    except RuntimeError:
        return None


def _crop(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[bool, bool]:
    """Centre-crop `conv`'s odd kernel sides above 3 to 3, in place, if its output shape
    stays the same at `hw` and a second size. Returns (cropped, exact): exact when the
    cropped-off border was all zeros and the conv convolves with its raw weight."""
    sides = _crop_sides(conv)
    if not sides:
        return False, False
    sizes = [tuple(hw), (hw[0] + 1, hw[1] + 2)]
    before = [_out_hw(conv, s) for s in sizes]
    if any(b is None for b in before):
        return False, False
    old = (conv.weight, conv.kernel_size, conv.padding, conv._reversed_padding_repeated_twice)
    w = conv.weight
    crop = [slice(None)] * w.dim()
    kernel = list(conv.kernel_size)
    for i in sides:
        start = (kernel[i] - _SMALL_KERNEL) // 2
        crop[2 + i] = slice(start, start + _SMALL_KERNEL)
        kernel[i] = _SMALL_KERNEL
    paddings = []
    if not isinstance(conv.padding, str):
        shrunk = list(conv.padding)
        for i in sides:
            shrunk[i] -= conv.dilation[i] * (conv.kernel_size[i] - _SMALL_KERNEL) // 2
        if min(shrunk) >= 0:
            paddings.append(tuple(shrunk))
    paddings.append(conv.padding)  # padding computed from the kernel at run time
    conv.weight = nn.Parameter(w.detach()[tuple(crop)].clone(), requires_grad=w.requires_grad)
    conv.kernel_size = tuple(kernel)
    for padding in paddings:
        _set_padding(conv, padding)
        if [_out_hw(conv, s) for s in sizes] == before:
            exact = False
            if not w.is_meta and type(conv) in _RAW_WEIGHT_CONVS:
                border = w.detach().clone()
                border[tuple(crop)] = 0
                exact = not bool(border.any())
            return True, exact
    conv.weight, conv.kernel_size = old[0], old[1]
    conv.padding, conv._reversed_padding_repeated_twice = old[2], old[3]
    return False, False


# --- the layer ----------------------------------------------------------------------------


def _same_modes(dst: nn.Module, src: nn.Module) -> None:
    for a, b in zip(dst.modules(), src.modules()):
        a.training = b.training


@torch.no_grad()
def _runs(layer: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...]) -> bool:
    modes = [(m, m.training) for m in layer.modules()]
    try:
        layer.eval()
        y = layer(x.detach())
        return isinstance(y, torch.Tensor) and tuple(y.shape) == tuple(out_shape)
    except Exception:  # a slice Torch-Pruning got wrong: the layer is not valid, never a crash
        return False
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def _measure(trace: _Trace, layer: nn.Module, sample: torch.Tensor) -> None:
    """RMS of every input channel of the layer's convs and linears (pooled ones aside) on
    `sample`, for the importance of the channels they read."""
    ref = trace.example

    def record(module, args):
        a = args[0].detach().float()
        dims = [0, *range(2, a.dim())] if isinstance(module, nn.modules.conv._ConvNd) else list(range(a.dim() - 1))
        trace.act_rms[module] = a.pow(2).mean(dim=dims).sqrt()

    readers = [m for m in layer.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in trace.context]
    hooks = [m.register_forward_pre_hook(record) for m in readers]
    modes = [(m, m.training) for m in layer.modules()]
    try:
        layer.eval()
        layer(sample.to(device=ref.device, dtype=ref.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training


def thin_layer(teacher_layer: nn.Module, in_chs: int, stride: int, w: int = 100, k3: bool = False,
               sample: torch.Tensor | None = None) -> nn.Module:
    """A copy of `teacher_layer` with every internal channel group kept at `w` percent
    (`kept_channels`) and, with `k3`, kernels above 3 cropped to 3.

    `in_chs` and `stride` give the example input (`in_chs` channels, `8 * stride` square).
    `sample`, a batch of the layer's real input, makes the choice of channels data-aware:
    a channel's importance is then its measured RMS where each layer reads it times that
    layer's weights on it, instead of the weights alone (half the output error of the
    weights-only choice on a trained EfficientNet-B0 at w50). The structure is the same
    either way. The copy is made on meta when the default device is meta or the layer is
    on meta (channels then kept by position); else on the layer's device, with the
    teacher's weights for everything kept. Its parameters are all trainable; train/eval
    modes are the teacher's. Sets `hant_init`: "teacher" when nothing was dropped and every
    cropped border was zero, else "teacher-partial". Raises HantError (Torch-Pruning
    missing, or the pruned copy does not run or changes the output shape) and whatever
    tracing the layer raises.
    """
    ref = _first_param(teacher_layer)
    meta = _on_meta() or (ref is not None and ref.is_meta)
    device = torch.device("meta") if meta else (ref.device if ref is not None else torch.device("cpu"))
    # Inner device context: tensors created on the way (by the layer or the pruner) land
    # next to the copy's weights whatever the caller's default device is.
    with torch.device(device), torch.inference_mode(False), torch.enable_grad():
        layer = _copy(teacher_layer, meta)
        trace = _trace(layer, in_chs, stride)
        if sample is not None and not meta:
            _measure(trace, layer, sample)
        exact = True
        if w < 100 and _prune(trace, w):
            exact = False
        if k3:
            for conv, hw in trace.conv_hw.items():
                cropped, crop_exact = _crop(conv, hw)
                exact = exact and (crop_exact or not cropped)
        if not _runs(layer, trace.example, trace.out_shape):
            raise HantError(
                f"self_w{w}{'_k3' if k3 else ''}: the thinned copy of {type(teacher_layer).__name__} does not keep "
                "its output shape; leave this layer out of the `self` family"
            )
    for p in layer.parameters():
        p.requires_grad_(True)
    _same_modes(layer, teacher_layer)
    layer.hant_init = INIT_TEACHER if exact else INIT_PARTIAL
    return layer


# Analyses of teacher layers, by layer object and (in_chs, stride). Entries go with their
# layer; it only memoises shape facts, which a layer's weights cannot change.
_ANALYSES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], _Analysis | None]]" = weakref.WeakKeyDictionary()


def _analyse(teacher_layer: nn.Module, in_chs: int, stride: int) -> _Analysis | None:
    """Internal groups and croppable convs of `teacher_layer` (on a meta copy: no weight is
    copied), or None when it cannot be traced."""
    try:
        per_layer = _ANALYSES.setdefault(teacher_layer, {})
    except TypeError:  # not weak-referenceable: analyse every time
        per_layer = {}
    key = (in_chs, stride)
    if key in per_layer:
        return per_layer[key]
    result = None
    try:
        with torch.device("meta"), torch.inference_mode(False), torch.enable_grad():
            layer = _copy(teacher_layer, meta=True)
            trace = _trace(layer, in_chs, stride)
            groups = tuple(info for info, _ in trace.groups)
            # Crop and prune the copy as far as any spec does, then run it once: a slice
            # Torch-Pruning gets wrong, or a crop that changes the block's output, shows here.
            names = {m: n for n, m in layer.named_modules()}
            crops = tuple(names[m] for m, hw in trace.conv_hw.items() if _crop(m, hw)[0])
            _prune(trace, min(_W))
            if not _runs(layer, trace.example, trace.out_shape):
                groups = ()
                crops = _crops_alone(teacher_layer, in_chs, stride)
            result = _Analysis(groups, crops, trace.out_shape[1])
    except Exception:  # untraceable layer: the family is not valid for it, init goes on
        result = None
    per_layer[key] = result
    return result


def _crops_alone(teacher_layer: nn.Module, in_chs: int, stride: int) -> tuple[str, ...]:
    """The croppable convs of a layer whose pruned copy fails, if the cropped copy runs."""
    layer = _copy(teacher_layer, meta=True)
    trace = _trace(layer, in_chs, stride)
    names = {m: n for n, m in layer.named_modules()}
    crops = tuple(names[m] for m, hw in trace.conv_hw.items() if _crop(m, hw)[0])
    return crops if _runs(layer, trace.example, trace.out_shape) else ()


def internal_groups(teacher_layer: nn.Module, in_chs: int, stride: int = 1) -> tuple[ChannelGroup, ...]:
    """The internal channel groups `self_w<W>` prunes in `teacher_layer` (empty when there
    are none or the layer cannot be traced)."""
    a = _analyse(teacher_layer, in_chs, stride)
    return a.groups if a is not None else ()



def valid_self(in_chs: int, out_chs: int, stride: int, *, w: int, k3: bool, teacher_layer: nn.Module | None = None,
               **_: Any) -> bool:
    """Whether `self_w<w>[_k3]` changes `teacher_layer` (mapping in_chs -> out_chs at
    `stride`): for w < 100, at least one internal group loses channels; with k3, at least
    one kernel is cropped; `self_w100` alone is the teacher and is not valid. False without
    a teacher layer or for one that cannot be traced."""
    if teacher_layer is None or (w >= 100 and not k3):
        return False
    a = _analyse(teacher_layer, in_chs, stride)
    if a is None or a.out_chs != out_chs:
        return False
    if w < 100 and not any(kept_channels(g.channels, w, g.split) < g.channels for g in a.groups):
        return False
    return not k3 or bool(a.crops)


def build_self(in_chs: int, out_chs: int, stride: int, *, w: int, k3: bool, teacher_layer: nn.Module,
               sample: torch.Tensor | None = None) -> nn.Module:
    """The teacher's layer with internal widths at `w` percent and, with `k3`, kernels
    above 3 cropped to 3 (see the module docstring); `sample` (a batch of the layer's input)
    chooses the kept channels from data, as `thin_layer` does. Raises SpecError when the spec
    does not change this layer (see `valid_self`), HantError when the thinned copy fails."""
    if not valid_self(in_chs, out_chs, stride, w=w, k3=k3, teacher_layer=teacher_layer):
        raise SpecError(
            f"self_w{w}{'_k3' if k3 else ''} does not fit this layer ({type(teacher_layer).__name__}, "
            f"{in_chs}->{out_chs}, stride {stride}); choose one of the layer's candidates"
        )
    return thin_layer(teacher_layer, in_chs, stride, w=w, k3=k3, sample=sample)


FAMILY = Family(
    "self",
    build_self,
    params=(Param("w", "int", _W), Param("k3", "flag")),
    valid=valid_self,
    needs_teacher=True,
    description="the teacher's own layer, internal width at w% (kept by importance), [k3: kernels cropped to 3]",
)
