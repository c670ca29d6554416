"""Initialise a candidate from the teacher's layer where the shapes allow it.

A candidate that starts close to the layer it imitates needs far fewer images to get
close to it. The transfer works on state dicts, so it covers every block whose
parameters are named alike, and timm's blocks (which hant's `mb`, `fmb` and `ds` ops
reuse) are:

- same block, other kernel size: the depthwise (or expansion) kernel is centre-cropped
  or zero-padded; zero-padding with "same" padding leaves the function unchanged;
- same block, other expansion: fewer channels keep the most important ones of the
  teacher (effective L1 norm in and out of the channel); more channels keep all of the
  teacher's and add new ones whose contribution to the output (and to the SE squeeze)
  starts at zero, so the function is unchanged;
- SE removed: everything else is copied, and given a sample of the layer's input, the
  teacher's mean SE gate per channel is folded into the projection (exact in the mean);
  SE added: the rest is copied, the SE is new;
- another activation: the weights are copied all the same (a near start, not exact).

Blocks of another class (a `conv` candidate for an MBConv layer, say) start random.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["INIT_TEACHER", "INIT_PARTIAL", "INIT_RANDOM", "init_from_teacher", "channel_importance"]

INIT_TEACHER = "teacher"  # computes exactly the teacher's function at the start
INIT_PARTIAL = "teacher-partial"  # some tensors copied (cropped, selected or padded)
INIT_RANDOM = "random"

# The channel dimension that the expansion ratio changes, per tensor name, for timm's
# InvertedResidual (conv_pw expands), EdgeResidual (conv_exp expands) and their SE.
_MID_DIM = {
    "conv_pw.weight": 0,
    "conv_exp.weight": 0,
    "conv_dw.weight": 0,
    "se.conv_reduce.weight": 1,
    "se.conv_expand.weight": 0,
    "se.conv_expand.bias": 0,
    "conv_pwl.weight": 1,
}
# Batch norms that sit on the expanded channels (InvertedResidual: bn1, bn2; EdgeResidual: bn1).
_MID_BN = ("bn1.", "bn2.")
# Where a channel enters and leaves the expansion, for its importance.
_EXPAND = ("conv_pw", "conv_exp")
# Tensors whose new (extra) channels must start at zero so the block's function is unchanged:
# the projection's input columns, and the SE squeeze's inputs (the mean over channels).
_ZERO_NEW = ("conv_pwl.weight", "se.conv_reduce.weight")


def _mid_channels(module: nn.Module) -> int | None:
    for name in _EXPAND:
        conv = getattr(module, name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(getattr(module, "conv_pwl", None), nn.Conv2d):
            return conv.out_channels
    return None


def _bn_scale(module: nn.Module, name: str, n: int) -> torch.Tensor:
    bn = getattr(module, name, None)
    if isinstance(bn, nn.BatchNorm2d) and bn.num_features == n and bn.running_var is not None:
        w = bn.weight if bn.weight is not None else torch.ones(n)
        return (w.detach().abs() / (bn.running_var + bn.eps).sqrt()).float()
    return torch.ones(n)


def channel_importance(module: nn.Module) -> torch.Tensor | None:
    """Importance of each expanded channel of an expand-project block (None if it has none).

    The product of how strongly the channel is written (L1 norm of its expansion filter,
    scaled by its batch norm) and how strongly it is read (L1 norm of its column in the
    projection, scaled by the batch norm before it): a channel that is weak at either end
    contributes little to the block's output.
    """
    mid = _mid_channels(module)
    if mid is None:
        return None
    expand = next(getattr(module, n) for n in _EXPAND if isinstance(getattr(module, n, None), nn.Conv2d))
    w_in = expand.weight.detach().abs().flatten(1).sum(1).float() * _bn_scale(module, "bn1", mid)
    w_out = module.conv_pwl.weight.detach().abs().sum(dim=(0, 2, 3)).float()
    # InvertedResidual has a second norm (after the depthwise conv) on the expanded channels.
    if isinstance(getattr(module, "conv_dw", None), nn.Conv2d):
        w_out = w_out * _bn_scale(module, "bn2", mid)
    return w_in * w_out


def _is_mid_dim(name: str, dim: int) -> bool:
    if _MID_DIM.get(name) == dim:
        return True
    return dim == 0 and name.startswith(_MID_BN) and not name.endswith("num_batches_tracked")


def _fit_kernel(src: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop or zero-pad the last two dims of `src` to `size`."""
    out = src.new_zeros(*src.shape[:-2], *size)
    sh, sw = src.shape[-2:]
    th, tw = size
    h, w = min(sh, th), min(sw, tw)
    s0, s1 = (sh - h) // 2, (sw - w) // 2
    t0, t1 = (th - h) // 2, (tw - w) // 2
    out[..., t0 : t0 + h, t1 : t1 + w] = src[..., s0 : s0 + h, s1 : s1 + w]
    return out


def _fit(name: str, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """`src` (teacher) brought to `dst`'s shape, or None when the dims do not correspond."""
    if src.dim() != dst.dim():
        return None
    out = src
    # Kernels first, so that new channels appended below already have the candidate's kernel size.
    if out.dim() == 4 and out.shape[2:] != dst.shape[2:]:
        out = _fit_kernel(out, tuple(dst.shape[2:]))
    dims = range(min(out.dim(), 2))
    # Only the expanded channels may differ (an SE squeeze of another width does not correspond).
    if any(out.shape[d] != dst.shape[d] and (keep is None or not _is_mid_dim(name, d)) for d in dims):
        return None
    for dim in dims:
        a, b = out.shape[dim], dst.shape[dim]
        if a == b:
            continue
        if b < a:
            out = out.index_select(dim, keep)
        else:
            # Teacher channels first, then the candidate's own new channels.
            extra = dst.narrow(dim, a, b - a)
            if name in _ZERO_NEW:
                extra = torch.zeros_like(extra)
            out = torch.cat([out, extra.to(out.dtype)], dim=dim)
    return out if out.shape == dst.shape else None


def _structure(module: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in module.named_modules()]


def _mean_se_gate(teacher_layer: nn.Module, sample: torch.Tensor) -> torch.Tensor | None:
    """The teacher's SE gate per channel, averaged over `sample` (None without a gate module)."""
    gate = getattr(getattr(teacher_layer, "se", None), "gate", None)
    if not isinstance(gate, nn.Module):
        return None
    seen = []
    handle = gate.register_forward_hook(lambda m, i, o: seen.append(o.detach().float()))
    modes = [(m, m.training) for m in teacher_layer.modules()]
    try:
        teacher_layer.eval()
        teacher_layer(sample)
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    if not seen or seen[0].dim() != 4:
        return None
    return seen[0].mean(dim=(0, 2, 3)).cpu()


@torch.no_grad()
def init_from_teacher(candidate: nn.Module, teacher_layer: nn.Module, sample: torch.Tensor | None = None) -> str:
    """Copy what fits of `teacher_layer`'s weights into `candidate`, in place.

    Takes the freshly built candidate, the teacher's layer (unchanged) and optionally a
    batch of the layer's input, used to fold the mean SE gate into the projection when
    the candidate drops the teacher's SE. Returns how
    the candidate starts: `teacher` (its function equals the teacher's layer),
    `teacher-partial` (some tensors copied, cropped, selected or padded) or `random`
    (nothing fits: another block class, or no shared tensor names and shapes).
    """
    if type(candidate) is not type(teacher_layer):
        return INIT_RANDOM
    t_sd = teacher_layer.state_dict()
    c_sd = candidate.state_dict()
    t_mid, c_mid = _mid_channels(teacher_layer), _mid_channels(candidate)
    keep = None
    if t_mid is not None and c_mid is not None and c_mid < t_mid:
        score = channel_importance(teacher_layer)
        keep = torch.topk(score, c_mid).indices.sort().values
    elif t_mid is not None and c_mid is not None:
        keep = torch.arange(t_mid)  # nothing dropped; only marks the mid dims as resizable

    if (sample is not None and t_mid is not None and "se.conv_reduce.weight" in t_sd
            and "se.conv_reduce.weight" not in c_sd and "conv_pwl.weight" in t_sd):
        g = _mean_se_gate(teacher_layer, sample)
        if g is not None and g.numel() == t_sd["conv_pwl.weight"].shape[1]:
            t_sd = dict(t_sd)
            w = t_sd["conv_pwl.weight"]
            t_sd["conv_pwl.weight"] = w * g.to(w.dtype).view(1, -1, 1, 1)

    copied, exact = 0, True
    new_sd = {}
    for name, dst in c_sd.items():
        src = t_sd.get(name)
        if src is None:
            exact = False
            continue
        if name.endswith("num_batches_tracked"):
            new_sd[name] = src.clone()
            continue
        fitted = src if src.shape == dst.shape else _fit(name, src, dst, keep)
        if fitted is None:
            exact = False
            continue
        new_sd[name] = fitted.to(dst.dtype).clone()
        copied += 1
        if src.shape != dst.shape:
            # Zero-padding a kernel or adding zero-read channels keeps the function;
            # cropping or dropping channels does not.
            if any(b < a for a, b in zip(src.shape, dst.shape)):
                exact = False
    if copied == 0:
        return INIT_RANDOM
    candidate.load_state_dict(new_sd, strict=False)
    dropped = set(t_sd) - set(c_sd)
    if dropped or _structure(candidate) != _structure(teacher_layer):
        exact = False
    # An added SE (teacher has none) is new and random: it changes the function.
    return INIT_TEACHER if exact else INIT_PARTIAL
