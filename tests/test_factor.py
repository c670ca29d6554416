"""Factorised convolutions from the teacher's weights (`sep`, `lr`, `sp`, `grp`): grammar,
shapes, exactness where the maths promises it, closeness and cost at reduced rank,
validity, meta building, and shape-only structure."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock

from hant import ops
from hant.ops import Registry, SpecError
from hant.ops.factor import FAMILIES, lowrank_conv, sep_conv, spatial_conv

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = ["sep", "lr_r25", "lr_r50", "sp_r25", "sp_r50", "grp_g2", "grp_g4"]
REG = Registry(FAMILIES)


def _build(spec: str, teacher: nn.Module, in_chs: int = 8, out_chs: int = 8, stride: int = 1) -> nn.Module:
    family, op = REG.resolve(spec)
    return family.builder(in_chs, out_chs, stride, teacher_layer=teacher, **op.args)


def _valid(spec: str, teacher: nn.Module | None) -> bool:
    family, op = REG.resolve(spec)
    return family.valid(8, 8, 1, teacher_layer=teacher, **op.args)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def _nmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y - ref) ** 2).sum() / (ref**2).sum())


def _randomised(candidate: nn.Module, teacher: nn.Module) -> nn.Module:
    """The candidate with every conv that is not the teacher's own re-initialised at random."""
    out = copy.deepcopy(candidate)
    teacher_mods = dict(teacher.named_modules())
    for name, m in out.named_modules():
        t = teacher_mods.get(name)
        if isinstance(m, nn.Conv2d) and (t is None or t.weight.shape != m.weight.shape):
            m.reset_parameters()
    return out


def _conv_bn_relu(in_chs: int = 8, out_chs: int = 8, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU())


def _tv_basic(in_chs: int = 8, out_chs: int = 16, stride: int = 2) -> BasicBlock:
    down = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))
    return BasicBlock(in_chs, out_chs, stride, downsample=down)


def _timm_basic() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=0).layer2[0]


def test_parse_encode_round_trip_and_errors():
    for spec in SPECS:
        assert REG.parse(spec).encode() == spec
    assert REG.parse("lr_r25").args == {"r": 25}
    assert REG.parse("grp_g4").args == {"g": 4}
    assert all(REG.get(f.name).needs_teacher for f in FAMILIES)
    for bad in ("lr", "lr_r30", "sp_r025", "grp_g3", "sep_r25", "grp_g2_g4"):
        with pytest.raises(SpecError):
            REG.parse(bad)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_bare_conv_keeps_shape_and_costs_less(stride, k, bias):
    torch.manual_seed(0)
    teacher = nn.Conv2d(8, 16, k, stride, k // 2, bias=bias).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        y = teacher(x)
        for spec in SPECS:
            assert _valid(spec, teacher), spec
            m = _build(spec, teacher, 8, 16, stride).eval()
            assert m.hant_init == "teacher-partial"
            assert m(x).shape == y.shape, spec
            assert _flops(m, x) < _flops(teacher, x), spec
            if bias:  # the teacher's bias reaches the output unchanged
                last = [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1]
                assert torch.equal(last.bias, teacher.bias)


@pytest.mark.parametrize(
    "make, in_chs, out_chs, stride",
    [
        (_conv_bn_relu, 8, 8, 1),
        (lambda: _conv_bn_relu(8, 16, 2), 8, 16, 2),
        (_tv_basic, 8, 16, 2),
        (_timm_basic, 64, 128, 2),
    ],
    ids=["convbnrelu", "convbnrelu_s2", "tv_basic", "timm_basic"],
)
def test_blocks_keep_shape_and_run_backward(make, in_chs, out_chs, stride):
    torch.manual_seed(0)
    teacher = make()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, in_chs, 8, 8)
    y = teacher.eval()(x)
    for spec in SPECS:
        m = REG.build(spec, in_chs, out_chs, stride, teacher, in_hw=(8, 8))  # registry checks the shape too
        assert m.hant_init == "teacher-partial"
        assert type(m) is type(teacher)
        assert m(x).shape == y.shape
        assert not {id(p) for p in m.parameters()} & {id(p) for p in teacher.parameters()}
        m.train()
        m(x).square().mean().backward()
        assert all(p.grad is not None for p in m.parameters()), spec
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 10, 3, 1, 1, bias=True),
        nn.Conv2d(6, 10, (3, 5), 2, (2, 4), dilation=2, padding_mode="reflect"),
        nn.Conv2d(4, 40, 3, 1, 1, padding_mode="circular"),  # O > I*k: full rank is I*k
        Conv2dSame(6, 10, 3, 2),
    ],
    ids=["plain", "dilated_reflect_s2", "wide", "conv2dsame"],
)
def test_full_rank_is_exact(conv):
    torch.manual_seed(0)
    conv.eval()
    o, i, kh, kw = conv.weight.shape
    x = torch.randn(2, i, 15, 15)
    with torch.no_grad():
        y = conv(x)
        lr = lowrank_conv(conv, min(o, i * kh * kw))
        sp = spatial_conv(conv, min(i * kh, o * kw))
        for m in (lr, sp):
            assert m.hant_init == "teacher"
            assert type(m[0]) is type(conv)  # the factor carrying the kernel keeps the padding behaviour
            assert torch.allclose(m(x), y, atol=1e-4, rtol=1e-4)
        # a rank above full adds channels that start at zero
        assert torch.allclose(lowrank_conv(conv, o + 3)(x), y, atol=1e-4, rtol=1e-4)


def test_sep_and_grp_exact_when_the_weight_has_their_form():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, 2, 1, bias=True).eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        # W[o, i] = p[o, i] d[i]: each input channel's slice has rank 1
        conv.weight.copy_(torch.randn(8, 6, 1, 1) * torch.randn(1, 6, 3, 3))
        assert torch.allclose(sep_conv(conv)(x), conv(x), atol=1e-4, rtol=1e-4)
        mask = torch.block_diag(torch.ones(4, 3), torch.ones(4, 3))[:, :, None, None]
        conv.weight.mul_(mask)
        assert torch.allclose(_build("grp_g2", conv)(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["sep", "lr_r25", "lr_r50", "sp_r25", "sp_r50", "grp_g4"])
@pytest.mark.parametrize(
    "make", [lambda: nn.Conv2d(32, 32, 3, 1, 1), lambda: _tv_basic(32, 64, 2)], ids=["conv", "basic"]
)
def test_teacher_init_beats_random_and_costs_less(make, spec):
    torch.manual_seed(0)
    teacher = make().eval()
    in_chs = teacher.in_channels if isinstance(teacher, nn.Conv2d) else teacher.conv1.in_channels
    x = torch.randn(4, in_chs, 16, 16)
    with torch.no_grad():
        y = teacher(x)
        m = _build(spec, teacher).eval()
        rand = _randomised(m, teacher).eval()
        assert _nmse(m(x), y) < 0.9 * _nmse(rand(x), y)
        assert _nmse(m(x), y) < 1.0
        assert _flops(m, x) < _flops(teacher, x)


def test_grp_valid_only_for_divisible_channels():
    assert _valid("grp_g2", nn.Conv2d(6, 8, 3))
    assert not _valid("grp_g4", nn.Conv2d(6, 8, 3))
    assert not _valid("grp_g4", nn.Conv2d(8, 6, 3))
    assert _valid("grp_g4", nn.Conv2d(8, 12, 1))
    # a layer where only some convs divide: those are grouped, the others copied
    layer = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    m = _build("grp_g4", layer)
    assert (m[0].groups, m[2].groups) == (1, 4)
    assert torch.equal(m[0].weight, layer[0].weight)


def test_not_valid_where_nothing_gets_cheaper():
    pointwise = nn.Conv2d(8, 8, 1)
    depthwise_only = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
    ds = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
    for spec in SPECS:
        assert not _valid(spec, None)
        assert not _valid(spec, depthwise_only)
        assert not _valid(spec, StdConv2d(8, 8, 3))  # convolves a standardised weight: left alone
        with pytest.raises(SpecError):
            _build(spec, depthwise_only)
    for spec in ("sep", "sp_r25", "sp_r50"):
        assert not _valid(spec, pointwise)
        assert not _valid(spec, ds)
    for spec in ("sp_r25", "sp_r50"):  # no spatially separable form of a kernel 1 wide or high
        assert not _valid(spec, nn.Conv2d(8, 8, (3, 1)))
        assert not _valid(spec, nn.Conv2d(8, 8, (1, 3)))
    assert _valid("sep", nn.Conv2d(8, 8, (3, 1)))
    for spec in ("lr_r25", "lr_r50", "grp_g2"):
        assert _valid(spec, pointwise)  # 1x1 convs have cheaper low-rank and grouped forms
        assert _valid(spec, ds)
    assert not _valid("lr_r50", nn.Conv2d(1, 1, 1))  # even rank 1 costs twice as much
    assert not REG.is_valid("lr_r25", 8, 8, 1)  # registry without a teacher layer


def test_builds_on_meta_with_the_same_structure():
    torch.manual_seed(0)
    teacher = _tv_basic(8, 16, 2)
    for spec in SPECS:
        real = _build(spec, teacher, 8, 16, 2)
        with torch.device("meta"):
            meta = _build(spec, teacher, 8, 16, 2)
        shapes = [(k, v.shape) for k, v in real.state_dict().items()]
        assert [(k, v.shape) for k, v in meta.state_dict().items()] == shapes
        assert all(p.is_meta for p in meta.conv1.parameters())  # the factors: shapes only, no SVD
        assert ops.count_params(spec, 8, 16, 2, teacher, registry=REG) == sum(p.numel() for p in real.parameters())


def test_structure_depends_on_shapes_only():
    torch.manual_seed(0)
    a, b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        b.weight.zero_()
        b.weight[:, :, 1, 1] = torch.eye(16, 8)  # rank 8, each input slice rank 1
    x = torch.randn(1, 8, 6, 6)
    for spec in SPECS:
        from_a, from_b = _build(spec, a), _build(spec, b)
        from_b.load_state_dict(from_a.state_dict())  # strict: same names and shapes
        assert torch.equal(from_b(x), from_a(x))
