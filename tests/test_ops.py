"""Candidate operations: grammar, registry, building, shape contract, ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hant import ops
from hant.errors import HantError
from hant.onnx_io import export_onnx
from hant.ops import Param, Registry, SpecError
from hant.space import load_space

# One or two representative specs per built-in family; a family registered
# without an entry here is still tested through its first enumerated spec.
REPRESENTATIVE = {
    "mb": ["mb_k5_e3_se_silu", "mb_k1_e6_hswish"],
    "fmb": ["fmb_k3_e4_relu", "fmb_k5_e1_se_silu"],
    "ds": ["ds_k3_se_hswish", "ds_k7_relu"],
    "conv": ["conv_k3_relu", "conv_k1_silu"],
    "basic": ["basic_k3_relu"],
    "bottle": ["bottle_k3_e4_relu", "bottle_k5_e2_hswish"],
    "skip": ["skip"],
    "proj": ["proj"],
    "teacher": ["teacher"],
    "self": ["self_w50", "self_w25"],
    "sep": ["sep"],
    "lr": ["lr_r50"],
    "sp": ["sp_r25"],
    "grp": ["grp_g2"],
}
SHAPES = [(8, 16, 1), (8, 16, 2), (8, 8, 1)]


def _family_specs() -> list[str]:
    out = []
    for name in ops.families():
        out += REPRESENTATIVE.get(name) or [ops.get_family(name).specs()[0].encode()]
    return out


def _teacher_layer(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    return ops.build("mb_k3_e6_se_silu", in_chs, out_chs, stride)


def _conv_teacher_layer(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """A layer every family derived from the teacher can work on: dense 3x3 convolutions
    around an inner width of 16 channels."""
    return nn.Sequential(nn.Conv2d(in_chs, 16, 3, stride, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, out_chs, 3, 1, 1, bias=False), nn.BatchNorm2d(out_chs))


def _layer_for(spec: str, in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    if spec == "teacher":
        return _teacher_layer(in_chs, out_chs, stride)
    return _conv_teacher_layer(in_chs, out_chs, stride) if ops.needs_teacher(spec) else None


def _build(spec: str, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    return ops.build(spec, in_chs, out_chs, stride, teacher_layer=_layer_for(spec, in_chs, out_chs, stride))


def test_every_family_has_a_representative():
    assert set(REPRESENTATIVE) == set(ops.families())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", _family_specs())
def test_build_forward_backward_shape(spec, shape):
    in_chs, out_chs, stride = shape
    if not ops.is_valid(spec, in_chs, out_chs, stride, teacher_layer=_layer_for(spec, in_chs, out_chs, stride)):
        assert spec == "skip"
        return
    torch.manual_seed(0)
    m = _build(spec, in_chs, out_chs, stride)
    assert m.training
    x = torch.randn(2, in_chs, 8, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (2, out_chs, 8 // stride, 8 // stride)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{spec}: no gradient for {name}"


@pytest.mark.parametrize("spec", [s for s in _family_specs() if s not in ("skip", "proj") and not ops.needs_teacher(s)])
def test_residual_where_shapes_match(spec):
    # With the last BN's scale and shift zeroed, a residual block returns its
    # input (through the post-add activation for ResNet blocks); a plain one would not.
    torch.manual_seed(0)
    m = _build(spec, 8, 8, 1).eval()
    last_bn = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)][-1]
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        expect = x.clone()
        if isinstance(m, (ops.resnet.BasicBlock, ops.resnet.Bottleneck)):
            expect = list(m.children())[-1](expect)
        torch.testing.assert_close(m(x), expect)


def test_build_is_deterministic_under_seed():
    for spec in ["mb_k5_e3_se_silu", "fmb_k3_e4_relu", "bottle_k3_e4_relu"]:
        torch.manual_seed(7)
        a = ops.build(spec, 8, 16, 2).state_dict()
        torch.manual_seed(7)
        b = ops.build(spec, 8, 16, 2).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_check_does_not_consume_random_state():
    torch.manual_seed(3)
    ops.build("mb_k3_e3_silu", 8, 8, 1)
    after_checked = torch.rand(1)
    torch.manual_seed(3)
    ops.build("mb_k3_e3_silu", 8, 8, 1, check=False)
    assert torch.equal(after_checked, torch.rand(1))


def test_teacher_is_an_independent_deep_copy():
    teacher = _teacher_layer(8, 16, 2).eval()
    copy = ops.build("teacher", 8, 16, 2, teacher_layer=teacher)
    assert copy is not teacher and not copy.training  # modes kept as the teacher had them
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(copy(x), teacher(x))
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.allclose(copy(x), teacher(x))


def test_teacher_needs_teacher_layer():
    with pytest.raises(ValueError, match="teacher_layer"):
        ops.build("teacher", 8, 16, 2)


def test_teacher_with_wrong_shape_is_refused():
    with pytest.raises(HantError, match="output shape"):
        ops.build("teacher", 8, 16, 2, teacher_layer=_teacher_layer(8, 16, 1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("spec", _family_specs())
def test_onnx_export_matches_torch(spec):
    in_chs, out_chs, stride = (8, 8, 1) if spec == "skip" else (8, 16, 2)
    torch.manual_seed(0)
    m = _build(spec, in_chs, out_chs, stride)
    m.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        m(torch.randn(4, in_chs, 8, 8) * 2 + 0.5)
    m.eval()
    x = torch.randn(2, in_chs, 8, 8)
    # hant's one exporter, as the student is exported (dynamic batch); the table's fixed batch is the same graph.
    data = export_onnx(m, (in_chs, 8, 8))
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y_ort,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        y = m(x).numpy()
    assert y_ort.shape == y.shape
    np.testing.assert_allclose(y_ort, y, rtol=1e-4, atol=1e-5)


def test_skip_only_where_shape_is_kept():
    assert ops.is_valid("skip", 8, 8, 1)
    assert not ops.is_valid("skip", 8, 16, 1)
    assert not ops.is_valid("skip", 8, 8, 2)
    assert ops.is_valid("proj", 8, 16, 2) and ops.is_valid("mb_k3_e1_relu", 8, 16, 2)
    with pytest.raises(ValueError, match="skip"):
        ops.build("skip", 8, 8, 2)


@pytest.mark.parametrize("stride,in_hw,out_hw", [(2, (7, 7), None), (2, (1, 1), None), (1, (5, 3), (5, 3))])
def test_shape_check_at_given_size(stride, in_hw, out_hw):
    for spec in ["mb_k7_e3_silu", "fmb_k5_e2_relu", "basic_k5_relu", "proj"]:
        ops.build(spec, 8, 16, stride, in_hw=in_hw, out_hw=out_hw)


def test_shape_check_raises_on_mismatch():
    with pytest.raises(HantError, match="expected"):
        ops.build("mb_k3_e3_silu", 8, 16, 2, in_hw=(8, 8), out_hw=(3, 3))
    reg = Registry([ops.get_family("mb")])
    reg.register(ops.Family("bad", lambda i, o, s: nn.Conv2d(i, o + 1, 1, stride=s)))
    with pytest.raises(HantError, match="'bad'.*expected"):
        reg.build("bad", 8, 16, 1)


def test_count_params():
    assert ops.count_params("proj", 8, 16, 2) == 8 * 16 + 2 * 16
    assert ops.count_params("skip", 8, 8, 1) == 0
    assert ops.count_params("mb_k3_e6_se_silu", 8, 8, 1) > ops.count_params("mb_k3_e6_silu", 8, 8, 1)
    for spec in ["mb_k5_e3_se_silu", "fmb_k3_e4_relu", "bottle_k3_e4_relu", "ds_k3_se_hswish"]:
        built = ops.build(spec, 8, 16, 2)
        assert ops.count_params(spec, 8, 16, 2) == sum(p.numel() for p in built.parameters())
    teacher = ops.build("mb_k3_e6_se_silu", 8, 16, 2)
    assert ops.count_params("teacher", 8, 16, 2, teacher) == sum(p.numel() for p in teacher.parameters())


def test_round_trip_every_full_spec():
    specs = load_space("full").specs
    assert len(specs) >= 197
    for s in specs:
        op = ops.parse(s)
        assert op.encode() == s
        assert ops.parse(op.encode()) == op


def test_parse_fields():
    op = ops.parse("mb_k5_e3_se_silu")
    assert op.family == "mb"
    assert op.args == {"k": 5, "e": 3, "se": True, "act": "silu"}
    assert ops.parse("mb_k3_e6_relu").get("se") is False
    assert ops.parse("skip").params == ()
    for s in ["fmb_k3_e4_relu", "ds_k3_se_hswish", "conv_k3_relu", "basic_k3_relu", "bottle_k3_e4_relu", "proj", "teacher"]:
        assert ops.parse(s).encode() == s


@pytest.mark.parametrize(
    "spec,token",
    [
        ("xx_k3_relu", "xx"),  # unknown family
        ("mb_k3_e3_gelu", "gelu"),  # unknown token
        ("mb_k4_e3_silu", "k4"),  # bad value
        ("mb_k3_e5_silu", "e5"),
        ("mb_k03_e3_silu", "k03"),  # non-canonical number
        ("mb_e3_k3_silu", "k3"),  # wrong order
        ("mb_k3_e3_silu_se", "se"),
        ("mb_k3_k3_e3_silu", "k3"),  # duplicated
        ("mb_k3_e3_se_se_silu", "se"),
        ("mb_k3_e3_relu_silu", "silu"),
        ("mb_k3_e3", "act"),  # missing
        ("mb_k3_silu", "'e'"),
        ("skip_k3", "k3"),
        ("proj_relu", "relu"),
        ("conv_k3__relu", "empty token"),
    ],
)
def test_bad_specs_name_the_token(spec, token):
    with pytest.raises(ValueError) as info:
        ops.parse(spec)
    assert token in str(info.value)
    assert isinstance(info.value, HantError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["", None, 3])
def test_non_string_specs(spec):
    with pytest.raises(ValueError, match="spec"):
        ops.parse(spec)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="'mb' is already registered"):
        ops.register_family(ops.get_family("mb"))
    reg = Registry()
    reg.register(ops.Family("a", lambda i, o, s: nn.Identity()))
    with pytest.raises(SpecError, match="'a' is already registered"):
        reg.register(ops.Family("a", lambda i, o, s: nn.Identity()))
    assert reg.names() == ["a"]


def test_user_family_registration_round_trip():
    def build_gconv(in_chs, out_chs, stride, k, g, act):
        return nn.Sequential(
            nn.Conv2d(in_chs, out_chs, k, stride=stride, padding=k // 2, groups=g, bias=False),
            nn.BatchNorm2d(out_chs),
            ops.common.act_layer(act)(),
        )

    fam = ops.register_family(
        "gconv",
        build_gconv,
        [Param("k", "int", (3, 5)), Param("g", "int", (2, 4)), ops.common.ACT],
        valid=lambda i, o, s, k, g, act: i % g == 0 and o % g == 0,
    )
    try:
        assert "gconv" in ops.families()
        assert ops.parse("gconv_k5_g4_relu").args == {"k": 5, "g": 4, "act": "relu"}
        assert len(fam.specs()) == 2 * 2 * 3
        assert ops.is_valid("gconv_k3_g4_relu", 8, 16, 2) and not ops.is_valid("gconv_k3_g4_relu", 6, 16, 2)
        m = ops.build("gconv_k3_g2_silu", 8, 16, 2)
        assert m(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)
        with pytest.raises(ValueError, match="g3"):
            ops.parse("gconv_k3_g3_relu")
    finally:
        ops.unregister_family("gconv")
    assert "gconv" not in ops.families()
    with pytest.raises(ValueError, match="gconv"):
        ops.parse("gconv_k3_g2_relu")


@pytest.mark.parametrize(
    "params,word",
    [
        ((Param("k", "int", (3,)), Param("k", "flag")), "twice"),
        ((Param("act", "choice", ("relu",)), Param("gate", "choice", ("relu",))), "relu"),
        ((Param("k", "int", (3,)), Param("mode", "choice", ("k3",))), "k3"),
    ],
)
def test_ambiguous_family_declarations_are_refused(params, word):
    with pytest.raises(SpecError, match=word):
        ops.Family("odd", lambda i, o, s, **kw: nn.Identity(), params)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(name="K", kind="int", values=(3,)), "K"),
        (dict(name="k", kind="float", values=(3,)), "float"),
        (dict(name="k", kind="int", values=()), "non-empty"),
        (dict(name="a", kind="choice", values=("Relu",)), "choice"),
        (dict(name="k", kind="int", values=(3, 3)), "twice"),
    ],
)
def test_bad_param_declarations(kwargs, word):
    with pytest.raises(SpecError, match=word):
        Param(**kwargs)


def test_teacher_derived_family_is_judged_on_the_teacher_layer():
    """A family built from the teacher's layer is offered only where that layer suits it."""
    from hant.space import space_from_dict

    def build_half(in_chs, out_chs, stride, *, teacher_layer):
        m = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1)
        m.hant_init = "teacher-partial"
        return m

    def needs_conv(in_chs, out_chs, stride, *, teacher_layer=None):
        return isinstance(teacher_layer, nn.Conv2d)

    reg = Registry(ops.builtin_families())
    reg.register(ops.Family("half", build_half, valid=needs_conv, needs_teacher=True))
    space = space_from_dict({"name": "t", "candidates": ["teacher", "proj", "half"]}, registry=reg)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    assert "half" in space.candidates(8, 8, 1, conv)
    assert "half" not in space.candidates(8, 8, 1, nn.Identity())
    assert "half" not in space.candidates(8, 8, 1)  # no teacher layer, no derived candidate
    assert reg.needs_teacher("half") and not reg.needs_teacher("proj")
    with pytest.raises(SpecError, match="needs the teacher's layer"):
        reg.build("half", 8, 8, 1)
    with pytest.raises(SpecError, match="does not fit"):
        reg.build("half", 8, 8, 1, teacher_layer=nn.Identity())
    assert reg.build("half", 8, 8, 1, teacher_layer=conv).hant_init == "teacher-partial"
