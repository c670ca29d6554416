"""The `self` family (the teacher's own layer at reduced inner width): grammar, shapes and
cost across block types, exactness when the dropped channels are dead, closeness against
a random start, shape-only structure, meta building, validity, kernel crops, ONNX."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.layers import Conv2dSame
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hant import ops
from hant.ops import Registry, SpecError
from hant.ops.selfw import FAMILY, internal_groups, kept_channels, thin_layer, valid_self
from hant.onnx_io import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

REG = Registry([FAMILY])


def _seq() -> nn.Module:
    def cbr(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(cbr(8, 32), cbr(32, 16))


# name: (model factory, submodule, in_chs, stride)
BLOCKS = {
    "effb0_ir_k3": (lambda: timm.create_model("efficientnet_b0"), "blocks.1.0", 16, 2),
    "effb0_ir_k5": (lambda: timm.create_model("efficientnet_b0"), "blocks.5.0", 112, 2),
    "resnet18_down": (lambda: timm.create_model("resnet18"), "layer2.0", 64, 2),
    "resnet18_basic": (lambda: timm.create_model("resnet18"), "layer1.0", 64, 1),
    "tv_resnet50_bottle": (lambda: torchvision.models.resnet50(), "layer1.0", 64, 1),
    "regnetx_grouped": (lambda: timm.create_model("regnetx_002"), "s2.b1", 24, 2),
    "convnext": (lambda: timm.create_model("convnext_atto", ls_init_value=1.0), "stages.1.blocks.0", 80, 1),
    "mobilenetv3": (lambda: timm.create_model("mobilenetv3_large_100"), "blocks.2.0", 24, 2),
    "tv_mobilenetv3": (lambda: torchvision.models.mobilenet_v3_large(), "features.5", 40, 1),
    "conv_bn_relu_seq": (_seq, "", 8, 1),
}


@functools.lru_cache(maxsize=None)
def _cached_block(name: str, seed: int) -> nn.Module:
    factory, path, _, _ = BLOCKS[name]
    torch.manual_seed(seed)
    block = factory().get_submodule(path)
    # Weights at unit gain (ConvNeXt's start so small that its block is the identity) and
    # random norms, so that channels differ in importance and no branch starts at zero
    # (ResNet and RegNet zero their last BN's scale at init).
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.3 + 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return block.eval()


def _block(name: str, seed: int = 0) -> tuple[nn.Module, int, int, int]:
    """A fresh teacher block (eval) of type `name` with its in_chs, out_chs and stride."""
    block = copy.deepcopy(_cached_block(name, seed))
    _, _, in_chs, stride = BLOCKS[name]
    with torch.no_grad():
        out_chs = block(torch.zeros(1, in_chs, 8 * stride, 8 * stride)).shape[1]
    return block, in_chs, out_chs, stride


def _build(spec: str, teacher: nn.Module, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    return REG.build(spec, in_chs, out_chs, stride, teacher_layer=teacher).eval()


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _nmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y - ref) ** 2).mean() / ref.var())


def _input(in_chs: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(4, in_chs, size, size, generator=torch.Generator().manual_seed(seed))


def test_spec_round_trip_and_errors():
    for spec in ("self_w25", "self_w50", "self_w75_k3", "self_w100_k3"):
        assert REG.parse(spec).encode() == spec
    assert REG.parse("self_w50").args == {"w": 50, "k3": False}
    for bad in ("self_w60", "self_k3_w50", "self", "self_w50_k5"):
        with pytest.raises(SpecError):
            REG.parse(bad)


def test_kept_channels():
    assert kept_channels(96, 50) == 48
    assert kept_channels(4, 25) == 1 and kept_channels(1, 25) == 1
    assert kept_channels(10, 25) == 3  # a half rounds up, not to even
    assert kept_channels(672, 25) % 8 == 0 and kept_channels(72, 25) == 16
    assert [kept_channels(64, w) for w in (25, 50, 75, 100)] == [16, 32, 48, 64]
    assert kept_channels(56, 50, split=7) == 28 and kept_channels(24, 25, split=3) == 6


@pytest.mark.parametrize("name", list(BLOCKS))
def test_shapes_cost_and_closeness(name):
    teacher, in_chs, out_chs, stride = _block(name)
    x = _input(in_chs)
    with torch.no_grad():
        y_t = teacher(x)
    params, flops = _params(teacher), _flops(teacher, x)
    last_p = last_f = 0.0
    for w in (25, 50, 75):
        spec = f"self_w{w}"
        assert REG.is_valid(spec, in_chs, out_chs, stride, teacher_layer=teacher)
        m = _build(spec, teacher, in_chs, out_chs, stride)
        assert m.hant_init == "teacher-partial"
        with torch.no_grad():
            y = m(x)
        assert y.shape == y_t.shape
        p, f = _params(m) / params, _flops(m, x) / flops
        # Cost falls with w, roughly in proportion: a conv thinned on both sides costs
        # (w/100)^2 of itself, one on the block's input or output channels (or a shortcut)
        # w/100 or all of itself.
        assert last_p < p < 1 and last_f < f < 1
        assert (w / 100) ** 2 - 0.05 < f < w / 100 + 0.2
        last_p, last_f = p, f
    # The same structure built from another random teacher: the teacher's weights (kept
    # channels chosen by importance) start far closer to the teacher's function.
    other, *_ = _block(name, seed=1)
    mine = _build("self_w50", teacher, in_chs, out_chs, stride)
    rand = _build("self_w50", other, in_chs, out_chs, stride)
    with torch.no_grad():
        e_self, e_rand = _nmse(mine(x), y_t), _nmse(rand(x), y_t)
    assert e_self < 0.5 * e_rand, (e_self, e_rand)


def _kill_dropped(teacher: nn.Module, in_chs: int, stride: int, w: int) -> None:
    """Zero every writer (conv/linear rows and bias, norm scale and shift) of as many
    channels as `self_w<w>` drops, at scattered positions (the same in each channel split):
    those channels are then dead."""
    for g in internal_groups(teacher, in_chs, stride):
        per = g.channels // g.split
        kept = kept_channels(g.channels, w, g.split) // g.split
        scattered = torch.randperm(per, generator=torch.Generator().manual_seed(per))[kept:].tolist()
        dead = [k * per + j for k in range(g.split) for j in scattered]
        for member in g.members:
            path, side = member.rsplit(":", 1)
            if side == "out":
                m = teacher.get_submodule("" if path == "." else path)
                with torch.no_grad():
                    m.weight[dead] = 0
                    if getattr(m, "bias", None) is not None:
                        m.bias[dead] = 0


@pytest.mark.parametrize("name", list(BLOCKS))
def test_dead_channels_are_dropped_exactly(name):
    # Slicing every coupled tensor right (convs, grouped convs, BN, SE, linear) and keeping
    # the teacher's weights makes the thinned block compute the teacher's function exactly
    # when the dropped channels contributed nothing; importance must find them.
    teacher, in_chs, out_chs, stride = _block(name)
    assert internal_groups(teacher, in_chs, stride)
    _kill_dropped(teacher, in_chs, stride, 50)
    m = _build("self_w50", teacher, in_chs, out_chs, stride)
    x = _input(in_chs, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), teacher(x), rtol=1e-4, atol=1e-5)
    assert _params(m) < _params(teacher)


def test_internal_groups_leave_input_and_output_channels():
    ir, in_chs, _, stride = _block("effb0_ir_k3")
    groups = [(g.root, g.channels) for g in internal_groups(ir, in_chs, stride)]
    assert groups == [("conv_pw", 96), ("se.conv_reduce", 4)]
    basic, in_chs, _, stride = _block("resnet18_down")  # conv2, bn2 and the downsample write the output
    assert [(g.root, g.channels) for g in internal_groups(basic, in_chs, stride)] == [("conv1", 128)]
    # A depthwise-separable block's depthwise conv carries the block's input channels: only
    # its SE reduction is internal.
    torch.manual_seed(0)
    ds = timm.create_model("efficientnet_b0").blocks[0][0]
    assert [(g.root, g.channels) for g in internal_groups(ds, 32, 1)] == [("se.conv_reduce", 8)]


def test_sample_finds_channels_the_activation_switches_off():
    # Channels whose BN output is far below zero are dead after the ReLU, which only data
    # shows: the weights alone rank them first (large |beta|), a sample ranks them last.
    teacher, in_chs, out_chs, stride = _block("resnet18_basic")
    with torch.no_grad():
        teacher.bn1.weight[32:] = 0.01
        teacher.bn1.bias[32:] = -5.0
    x = _input(in_chs, seed=4)
    blind = thin_layer(teacher, in_chs, stride, w=50).eval()
    seen = thin_layer(teacher, in_chs, stride, w=50, sample=_input(in_chs, seed=5)).eval()
    assert [(k, v.shape) for k, v in seen.state_dict().items()] == [(k, v.shape) for k, v in blind.state_dict().items()]
    with torch.no_grad():
        y = teacher(x)
        torch.testing.assert_close(seen(x), y, rtol=1e-4, atol=1e-5)
        assert _nmse(blind(x), y) > 1e-3


@pytest.mark.parametrize("name", ["effb0_ir_k5", "regnetx_grouped", "convnext"])
def test_structure_depends_on_shapes_only(name):
    a, in_chs, out_chs, stride = _block(name, seed=0)
    b, *_ = _block(name, seed=1)
    ma = _build("self_w25_k3" if name != "regnetx_grouped" else "self_w25", a, in_chs, out_chs, stride)
    mb = _build("self_w25_k3" if name != "regnetx_grouped" else "self_w25", b, in_chs, out_chs, stride)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert [(k, v.shape) for k, v in sa.items()] == [(k, v.shape) for k, v in sb.items()]
    mb.load_state_dict(sa)  # a student rebuilt from a random teacher takes the saved weights
    x = _input(in_chs)
    with torch.no_grad():
        torch.testing.assert_close(mb(x), ma(x))


def test_builds_on_meta_and_leaves_the_teacher_alone():
    teacher, in_chs, out_chs, stride = _block("effb0_ir_k5")
    for p in teacher.parameters():
        p.requires_grad_(False)  # a frozen teacher
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cpu = _build("self_w50_k3", teacher, in_chs, out_chs, stride)
    with torch.device("meta"):
        meta = REG.build("self_w50_k3", in_chs, out_chs, stride, teacher_layer=teacher, check=False)
    assert all(p.is_meta for p in meta.parameters())
    assert [(k, v.shape) for k, v in meta.state_dict().items()] == [(k, v.shape) for k, v in cpu.state_dict().items()]
    assert ops.count_params("self_w50_k3", in_chs, out_chs, stride, teacher, registry=REG) == _params(cpu)
    # The candidate trains; the teacher keeps its weights, flags and mode.
    assert all(p.requires_grad for p in cpu.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_validity():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert not valid_self(8, 16, 1, w=50, k3=False, teacher_layer=conv)  # no internal channels
    assert not valid_self(8, 16, 1, w=50, k3=False, teacher_layer=None)
    assert not REG.is_valid("self_w50", 8, 16, 1)
    with pytest.raises(SpecError):
        REG.build("self_w50", 8, 16, 1, teacher_layer=conv)

    r18, in_chs, out_chs, stride = _block("resnet18_basic")
    assert REG.is_valid("self_w50", in_chs, out_chs, stride, teacher_layer=r18)
    assert not REG.is_valid("self_w100", in_chs, out_chs, stride, teacher_layer=r18)  # the teacher itself
    assert not REG.is_valid("self_w100_k3", in_chs, out_chs, stride, teacher_layer=r18)  # 3x3 kernels only
    assert not REG.is_valid("self_w50_k3", in_chs, out_chs, stride, teacher_layer=r18)
    assert not REG.is_valid("self_w50", in_chs, out_chs + 1, stride, teacher_layer=r18)  # another layer's shape

    class Pair(nn.Module):  # not a 4-D -> 4-D layer: not valid, no crash
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.a(x), self.b(x)

    assert not valid_self(8, 8, 1, w=50, k3=False, teacher_layer=Pair())


def test_k3_crops_a_depthwise_kernel():
    teacher, in_chs, out_chs, stride = _block("effb0_ir_k5")
    assert teacher.conv_dw.kernel_size == (5, 5)
    assert REG.is_valid("self_w100_k3", in_chs, out_chs, stride, teacher_layer=teacher)
    m = _build("self_w100_k3", teacher, in_chs, out_chs, stride)
    assert m.conv_dw.kernel_size == (3, 3) and m.conv_dw.padding == (1, 1)
    assert m.conv_pw.out_channels == teacher.conv_pw.out_channels  # width unchanged at w100
    torch.testing.assert_close(m.conv_dw.weight, teacher.conv_dw.weight[..., 1:4, 1:4])
    assert m.hant_init == "teacher-partial"
    for size in (16, 17):
        x = _input(in_chs, size=size)
        with torch.no_grad():
            assert m(x).shape == teacher(x).shape
    # A 5x5 kernel whose border is zero is a 3x3 kernel: the crop is then exact.
    with torch.no_grad():
        border = torch.ones_like(teacher.conv_dw.weight, dtype=torch.bool)
        border[..., 1:4, 1:4] = False
        teacher.conv_dw.weight[border] = 0
    m = _build("self_w100_k3", teacher, in_chs, out_chs, stride)
    assert m.hant_init == "teacher"
    x = _input(in_chs, size=17)
    with torch.no_grad():
        torch.testing.assert_close(m(x), teacher(x), rtol=1e-4, atol=1e-5)


def test_k3_with_padding_computed_at_run_time():
    # TF-style "same" padding (timm's Conv2dSame) derives the padding from the kernel.
    torch.manual_seed(0)
    layer = nn.Sequential(Conv2dSame(8, 8, 5, stride=2, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1, bias=False)).eval()
    m = _build("self_w100_k3", layer, 8, 16, 2)
    assert m[0].kernel_size == (3, 3)
    for size in (20, 21):
        x = _input(8, size=size)
        with torch.no_grad():
            assert m(x).shape == layer(x).shape
    # A conv without padding to give up would shrink its output: it keeps its kernel.
    unpadded = nn.Sequential(nn.Conv2d(8, 8, 5), nn.BatchNorm2d(8))
    assert not valid_self(8, 8, 1, w=100, k3=True, teacher_layer=unpadded)


def test_onnx_export_matches_torch():
    import onnxruntime as ort

    teacher, in_chs, out_chs, stride = _block("effb0_ir_k5")
    m = _build("self_w50_k3", teacher, in_chs, out_chs, stride)
    data = export_onnx(m, (in_chs, 16, 16))
    x = _input(in_chs)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, m(x).numpy(), rtol=1e-3, atol=1e-4)
