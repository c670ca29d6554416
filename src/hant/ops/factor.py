"""Factorised convolutions initialised from the teacher's weights: `sep`, `lr`, `sp`, `grp`.

A candidate of these families is a copy of the teacher's layer in which every dense
convolution (groups == 1) that the factorisation makes cheaper is replaced by its
factorised form, initialised from that convolution's weights; everything else (BN,
activations, residual, SE, depthwise and grouped convs) is copied as it is. For a bare
conv layer the candidate is the factorised conv alone.

Write a dense conv's weight W[o, i, y, x]: O outputs, I inputs, a kh x kw kernel,
k = kh*kw. Each form below is linear in the input, and its weights are the best
approximation of W of that form in the Frobenius norm (truncated SVD, Eckart-Young):
the smallest expected output error for inputs whose patches are white. The singular
values are split evenly, sqrt(s) on either factor: the minimum-norm factorisation,
which keeps both factors at one scale and is what weight decay leaves in place.

- `sep`, depthwise-separable: a depthwise kh x kw conv (the teacher's stride, padding,
  dilation) then a 1x1 conv. Together they compute W[o, i] = p[o, i] d[i]: each input
  channel's O x k slice W[:, i] has rank 1. Per input channel, W[:, i] = U S V^T gives
  d[i] = sqrt(s_1) v_1 and p[:, i] = sqrt(s_1) u_1. Cost per output pixel
  I*k + I*O multiply-adds instead of O*I*k.
- `lr_r<P>`, low rank: a kh x kw conv I -> r then a 1x1 conv r -> O. With W viewed as
  the O x (I*k) matrix U S V^T, the first is sqrt(S_r) V_r^T and the second U_r sqrt(S_r).
  Exact at r = min(O, I*k). Cost r*(I*k + O).
- `sp_r<P>`, spatially separable ("Speeding up Convolutional Neural Networks with Low
  Rank Expansions", 2014, scheme 2): a kh x 1 conv I -> r then a 1 x kw conv r -> O.
  W permuted to the (I*kh) x (O*kw) matrix M[(i, y), (o, x)] = U S V^T gives the
  vertical conv sqrt(S_r) U_r^T and the horizontal one sqrt(S_r) V_r^T. Exact at
  r = min(I*kh, O*kw). The vertical conv cannot stride along the width (the horizontal
  conv needs every column), so it runs on sw times as many columns as the output has:
  cost r*(I*kh*sw + O*kw). Only for kh > 1 and kw > 1.
- `grp_g<G>`, grouped: G groups, each output channel reading the I/G inputs of its
  group; the block-diagonal part of W, the rest dropped. Cost O*I*k/G. Only for convs
  whose in and out channels G divides.

`r<P>` is a budget, not a rank fraction: r is the largest rank whose pair costs at most
P% of the dense conv's multiply-adds, r = floor(P/100 * O*I*k / cost per rank). (A rank
fraction would not bound the cost: at half its full rank, the pair of a conv whose
O x (I*k) matrix is square, a 1x1 conv with as many outputs as inputs say, costs as
much as the conv.) For P < 100 that r is below full rank, so a spec's candidate is never exact;
`lowrank_conv(conv, rank)` and `spatial_conv(conv, rank)` take any rank.

A conv is replaced only where the factorisation is strictly cheaper (sep on a 1x1 conv
is not, sp on a kx1 or 1x1 is not defined, lr needs r >= 1), and a spec is valid for a
layer only if at least one of its convs is replaced. Which convs are replaced, and the
structure of every replacement, depends on shapes alone, never on weight values: a
student is rebuilt from a randomly initialised teacher and then loaded with saved weights.

Padding: zero, reflect, replicate and circular padding treat each axis on its own, so
factors that keep the teacher's padding along their kernel's axes (a 1x1 pads nothing)
compose to exactly the forms above; the first factor has no bias, so zeros padded
around its output are what the dense conv would have seen. timm's Conv2dSame computes
its padding per axis from kernel, stride and dilation, so the factors that carry the
kernel keep its class and its padding. Other subclasses of nn.Conv2d (weight
standardisation, quantisation-aware training) do not convolve with their raw weight and
are never factorised. The teacher's bias goes to the last factor.

Under `torch.device("meta")` (how `count_params` builds) the new convs are built on meta
and left uninitialised; otherwise they are built on the teacher conv's device and dtype
and the SVD runs there (in float32 at least).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
from timm.layers import Conv2dSame
from torch import nn

from hant.ops.registry import Family
from hant.ops.spec import Param, SpecError

__all__ = [
    "FAMILIES",
    "dense_convs",
    "is_dense_conv",
    "sep_conv",
    "lowrank_conv",
    "spatial_conv",
    "grouped_conv",
    "lr_rank",
    "sp_rank",
    "factorise_layer",
    "build_sep",
    "build_lr",
    "build_sp",
    "build_grp",
    "valid_sep",
    "valid_lr",
    "valid_sp",
    "valid_grp",
]

# Exact classes: a subclass may transform its weight before convolving (StdConv2d).
_FACTORISABLE = (nn.Conv2d, Conv2dSame)
_EXACT = "teacher"
_PARTIAL = "teacher-partial"


def is_dense_conv(module: nn.Module) -> bool:
    """Whether `module` is a convolution these families can factorise: an `nn.Conv2d` or
    timm `Conv2dSame` (exactly those classes) with groups == 1."""
    return type(module) in _FACTORISABLE and module.groups == 1


def dense_convs(layer: nn.Module) -> list[nn.Conv2d]:
    """The factorisable dense convs of `layer` (itself included), each once, in module order."""
    return [m for m in layer.modules() if is_dense_conv(m)]


# --- costs (multiply-adds per output pixel) and ranks -------------------------------------


def _dense_cost(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    return conv.out_channels * conv.in_channels * kh * kw


def _sep_cost(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    return conv.in_channels * (kh * kw + conv.out_channels)


def lr_rank(conv: nn.Conv2d, percent: int) -> int:
    """The rank of `lr_r<percent>` for `conv`: the largest whose kxk + 1x1 pair costs at most
    `percent`% of the conv's multiply-adds (0 when not even rank 1 does)."""
    kh, kw = conv.kernel_size
    per_rank = conv.in_channels * kh * kw + conv.out_channels
    return percent * _dense_cost(conv) // (100 * per_rank)


def sp_rank(conv: nn.Conv2d, percent: int) -> int:
    """The rank of `sp_r<percent>` for `conv`: the largest whose kh x 1 + 1 x kw pair costs at
    most `percent`% of the conv's multiply-adds; 0 for a kernel with a side of 1."""
    kh, kw = conv.kernel_size
    if kh == 1 or kw == 1:
        return 0
    per_rank = conv.in_channels * kh * conv.stride[1] + conv.out_channels * kw
    return percent * _dense_cost(conv) // (100 * per_rank)


def _grp_fits(conv: nn.Conv2d, groups: int) -> bool:
    return groups > 1 and conv.in_channels % groups == 0 and conv.out_channels % groups == 0


# --- building one factorised conv ---------------------------------------------------------


def _on_meta() -> bool:
    # The default device (set by `with torch.device(...)`); torch.get_default_device needs 2.3.
    return torch.empty(()).device.type == "meta"


def _conv_like(conv: nn.Conv2d, in_chs: int, out_chs: int, kernel_size, *, stride=1, padding=0,
               dilation=1, groups: int = 1, bias: bool = False, keep_class: bool = True) -> nn.Conv2d:
    """A new conv on `conv`'s device and dtype (meta under a meta default device); with
    `keep_class` of `conv`'s class and padding mode, else a plain zero-padded nn.Conv2d."""
    device = torch.device("meta") if _on_meta() else conv.weight.device
    cls = type(conv) if keep_class else nn.Conv2d
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                  device=device, dtype=conv.weight.dtype)
    if cls is nn.Conv2d:
        kwargs["padding_mode"] = conv.padding_mode if keep_class else "zeros"
    out = cls(in_chs, out_chs, kernel_size, **kwargs)
    out.train(conv.training)
    return out


def _check_dense(conv: nn.Module) -> None:
    if not is_dense_conv(conv):
        raise ValueError(f"expected an nn.Conv2d or Conv2dSame with groups=1, got {conv!r}")


def _real(*convs: nn.Conv2d) -> bool:
    return not any(c.weight.is_meta for c in convs)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD on the matrix's own device, in float32 at least."""
    m = matrix.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return torch.linalg.svd(m, full_matrices=False)


@torch.no_grad()
def _set(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    conv.weight.copy_(weight.reshape(conv.weight.shape))
    if bias is not None:
        conv.bias.copy_(bias)


def _pair(first: nn.Conv2d, second: nn.Conv2d, names: tuple[str, str], exact: bool) -> nn.Sequential:
    out = nn.Sequential(OrderedDict([(names[0], first), (names[1], second)]))
    out.hant_init = _EXACT if exact else _PARTIAL
    return out


def sep_conv(conv: nn.Conv2d) -> nn.Sequential:
    """Depthwise-separable form of a dense conv: `conv_dw` (depthwise, the conv's kernel,
    stride, padding and dilation) then `conv_pw` (1x1, the conv's bias).

    Initialised per input channel from the rank-1 SVD of W[:, i] (the best such
    approximation in Frobenius norm) unless built on meta. Returns a Sequential whose
    `hant_init` is "teacher-partial". Raises ValueError if `conv` is not dense.
    """
    _check_dense(conv)
    i_chs, o_chs = conv.in_channels, conv.out_channels
    dw = _conv_like(conv, i_chs, i_chs, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=i_chs)
    pw = _conv_like(conv, i_chs, o_chs, 1, bias=conv.bias is not None, keep_class=False)
    if _real(conv, dw):
        w = conv.weight.flatten(2).transpose(0, 1)  # (I, O, k)
        u, s, vh = _svd(w)
        root = s[:, 0].sqrt()  # (I,)
        _set(dw, (vh[:, 0, :] * root[:, None]).to(dw.weight.dtype))
        _set(pw, (u[:, :, 0] * root[:, None]).T.to(pw.weight.dtype), conv.bias)
    return _pair(dw, pw, ("conv_dw", "conv_pw"), exact=False)


def lowrank_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Rank-`rank` form of a dense conv: `conv_lr` (the conv's kernel, stride, padding and
    dilation, in -> rank) then `conv_pw` (1x1, rank -> out, the conv's bias).

    Initialised from the truncated SVD of W as an O x (I*k) matrix unless built on meta;
    at rank >= min(O, I*k) it computes the conv's function exactly (up to round-off) and
    its `hant_init` is "teacher", else "teacher-partial". Raises ValueError if `conv` is
    not dense or `rank` < 1.
    """
    _check_dense(conv)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    i_chs, o_chs = conv.in_channels, conv.out_channels
    kh, kw = conv.kernel_size
    full = min(o_chs, i_chs * kh * kw)
    first = _conv_like(conv, i_chs, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation)
    second = _conv_like(conv, rank, o_chs, 1, bias=conv.bias is not None, keep_class=False)
    if _real(conv, first):
        u, s, vh = _svd(conv.weight.flatten(1))  # (O, I*k)
        r = min(rank, full)
        root = s[:r].sqrt()
        a = torch.zeros_like(first.weight.flatten(1), dtype=u.dtype)  # ranks past full start at zero
        b = torch.zeros_like(second.weight.flatten(1), dtype=u.dtype)
        a[:r] = root[:, None] * vh[:r]
        b[:, :r] = u[:, :r] * root
        _set(first, a.to(first.weight.dtype))
        _set(second, b.to(second.weight.dtype), conv.bias)
    return _pair(first, second, ("conv_lr", "conv_pw"), exact=rank >= full)


def spatial_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Spatially separable rank-`rank` form of a dense kh x kw conv: `conv_v` (kh x 1,
    in -> rank, the conv's height stride, padding and dilation) then `conv_h` (1 x kw,
    rank -> out, the width ones, the conv's bias).

    Initialised from the truncated SVD of W permuted to (I*kh) x (O*kw) unless built on
    meta; at rank >= min(I*kh, O*kw) it is exact and its `hant_init` is "teacher", else
    "teacher-partial". Raises ValueError if `conv` is not dense, its kernel has a side of
    1, or `rank` < 1.
    """
    _check_dense(conv)
    kh, kw = conv.kernel_size
    if kh == 1 or kw == 1:
        raise ValueError(f"a spatially separable form needs a kernel of at least 2x2, got {kh}x{kw}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    i_chs, o_chs = conv.in_channels, conv.out_channels
    (sh, sw), (dh, dw_) = conv.stride, conv.dilation
    if isinstance(conv.padding, str):  # 'same'/'valid' mean the same along each axis
        pad_v = pad_h = conv.padding
    else:
        pad_v, pad_h = (conv.padding[0], 0), (0, conv.padding[1])
    full = min(i_chs * kh, o_chs * kw)
    vert = _conv_like(conv, i_chs, rank, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1))
    horiz = _conv_like(conv, rank, o_chs, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw_),
                       bias=conv.bias is not None)
    if _real(conv, vert):
        m = conv.weight.permute(1, 2, 0, 3).reshape(i_chs * kh, o_chs * kw)  # M[(i, y), (o, x)]
        u, s, vh = _svd(m)
        r = min(rank, full)
        root = s[:r].sqrt()
        v_w = torch.zeros(rank, i_chs * kh, dtype=u.dtype, device=u.device)
        h_w = torch.zeros(rank, o_chs, kw, dtype=u.dtype, device=u.device)
        v_w[:r] = (u[:, :r] * root).T
        h_w[:r] = (root[:, None] * vh[:r]).reshape(r, o_chs, kw)
        _set(vert, v_w.to(vert.weight.dtype))  # (r, I*kh) -> (r, I, kh, 1)
        _set(horiz, h_w.transpose(0, 1).to(horiz.weight.dtype), conv.bias)  # (O, r, kw) -> (O, r, 1, kw)
    return _pair(vert, horiz, ("conv_v", "conv_h"), exact=rank >= full)


def grouped_conv(conv: nn.Conv2d, groups: int) -> nn.Conv2d:
    """Grouped form of a dense conv: one conv of `conv`'s class with `groups` groups,
    initialised from the block-diagonal part of W (and the conv's bias) unless built on meta.

    Its `hant_init` is "teacher-partial". Raises ValueError if `conv` is not dense or
    `groups` does not divide its in and out channels.
    """
    _check_dense(conv)
    if not _grp_fits(conv, groups):
        raise ValueError(
            f"groups={groups} must be > 1 and divide in_chs={conv.in_channels} and out_chs={conv.out_channels}"
        )
    i_chs, o_chs = conv.in_channels, conv.out_channels
    out = _conv_like(conv, i_chs, o_chs, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=groups, bias=conv.bias is not None)
    if _real(conv, out):
        w = conv.weight.detach().reshape(groups, o_chs // groups, groups, i_chs // groups, *conv.kernel_size)
        diag = torch.diagonal(w, dim1=0, dim2=2).movedim(-1, 0)  # (G, O/G, I/G, kh, kw)
        _set(out, diag, conv.bias)
    out.hant_init = _PARTIAL
    return out


# --- the layer ----------------------------------------------------------------------------


def factorise_layer(layer: nn.Module, replace: Callable[[nn.Conv2d], nn.Module | None]) -> nn.Module:
    """A deep copy of `layer` in which each dense conv `c` (see `dense_convs`) is replaced
    by `replace(c)`, or copied when that returns None; `layer` is untouched and shares
    nothing with the copy. A conv used twice is replaced once, by one shared module.

    For a bare dense conv the result is `replace(layer)` itself. The copy's `hant_init` is
    "teacher" when every replacement says it is exact, else "teacher-partial". Raises
    SpecError when no conv is replaced.
    """
    replaced = {}
    for conv in dense_convs(layer):
        new = replace(conv)
        if new is not None:
            replaced[id(conv)] = new
    if not replaced:
        raise SpecError(f"no convolution of the teacher's layer ({type(layer).__name__}) can be factorised this way")
    exact = all(getattr(m, "hant_init", _PARTIAL) == _EXACT for m in replaced.values())
    # deepcopy returns what its memo holds for an object: the convs' replacements, so the
    # teacher's dense weights are never copied and every reference to a conv is redirected.
    out = replaced[id(layer)] if id(layer) in replaced else copy.deepcopy(layer, dict(replaced))
    out.hant_init = _EXACT if exact else _PARTIAL
    return out


def _sep_cheaper(conv: nn.Conv2d) -> bool:
    return _sep_cost(conv) < _dense_cost(conv)


def _sep_replace(conv):
    return sep_conv(conv) if _sep_cheaper(conv) else None


def _lr_replace(r):
    def replace(conv):
        rank = lr_rank(conv, r)
        return lowrank_conv(conv, rank) if rank >= 1 else None
    return replace


def _sp_replace(r):
    def replace(conv):
        rank = sp_rank(conv, r)
        return spatial_conv(conv, rank) if rank >= 1 else None
    return replace


def _grp_replace(g):
    return lambda conv: grouped_conv(conv, g) if _grp_fits(conv, g) else None


def build_sep(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module) -> nn.Module:
    """The teacher's layer with each dense conv that it makes cheaper (kernel larger than
    1x1, more than one output) made depthwise-separable, initialised from its weights.
    Raises SpecError when there is none."""
    return factorise_layer(teacher_layer, _sep_replace)


def build_lr(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module, r: int) -> nn.Module:
    """The teacher's layer with each dense conv replaced by a low-rank pair costing at most
    `r`% of it (see `lr_rank`), initialised by truncated SVD. Raises SpecError when no conv
    gets rank 1 within that budget."""
    return factorise_layer(teacher_layer, _lr_replace(r))


def build_sp(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module, r: int) -> nn.Module:
    """The teacher's layer with each dense conv of kernel at least 2x2 replaced by a
    spatially separable pair costing at most `r`% of it (see `sp_rank`), initialised by
    truncated SVD. Raises SpecError when there is none."""
    return factorise_layer(teacher_layer, _sp_replace(r))


def build_grp(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module, g: int) -> nn.Module:
    """The teacher's layer with each dense conv whose channels `g` divides made a `g`-group
    conv, initialised from the block-diagonal part of its weight. Raises SpecError when
    there is none."""
    return factorise_layer(teacher_layer, _grp_replace(g))


def valid_sep(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module | None = None) -> bool:
    """Whether `teacher_layer` has a dense conv that a depthwise-separable form makes cheaper."""
    return teacher_layer is not None and any(_sep_cheaper(c) for c in dense_convs(teacher_layer))


def valid_lr(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module | None = None, r: int) -> bool:
    """Whether `teacher_layer` has a dense conv with a low-rank pair of rank >= 1 within `r`% of its cost."""
    return teacher_layer is not None and any(lr_rank(c, r) >= 1 for c in dense_convs(teacher_layer))


def valid_sp(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module | None = None, r: int) -> bool:
    """Whether `teacher_layer` has a dense conv (kernel at least 2x2) with a spatially
    separable pair of rank >= 1 within `r`% of its cost."""
    return teacher_layer is not None and any(sp_rank(c, r) >= 1 for c in dense_convs(teacher_layer))


def valid_grp(in_chs: int, out_chs: int, stride: int, *, teacher_layer: nn.Module | None = None, g: int) -> bool:
    """Whether `teacher_layer` has a dense conv whose in and out channels `g` divides."""
    return teacher_layer is not None and any(_grp_fits(c, g) for c in dense_convs(teacher_layer))


_BUDGET = Param("r", "int", (25, 50))

FAMILIES = [
    Family("sep", build_sep, valid=valid_sep, needs_teacher=True,
           description="teacher's layer, dense convs made depthwise-separable (SVD-initialised)"),
    Family("lr", build_lr, params=(_BUDGET,), valid=valid_lr, needs_teacher=True,
           description="teacher's layer, dense convs as kxk->r + 1x1 at <= r% of their FLOPs (e.g. lr_r25)"),
    Family("sp", build_sp, params=(_BUDGET,), valid=valid_sp, needs_teacher=True,
           description="teacher's layer, dense convs as kx1->r + 1xk at <= r% of their FLOPs (e.g. sp_r50)"),
    Family("grp", build_grp, params=(Param("g", "int", (2, 4)),), valid=valid_grp, needs_teacher=True,
           description="teacher's layer, dense convs made g-group convs, block-diagonal init (e.g. grp_g2)"),
]
