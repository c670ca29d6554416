"""Candidate pools: built-in spaces, YAML files, per-layer filtering, errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from hant import ops
from hant.errors import HantError
from hant.ops import Param, Registry
from hant.space import Space, list_spaces, load_space

# Stride-1 layer of EfficientNet-B0 stage 3 (40 -> 40), a stride-2 layer, a channel change.
SHAPES = [(40, 40, 1), (40, 80, 2), (24, 40, 1), (8, 8, 1)]


def test_builtin_spaces_are_listed():
    assert {"full", "default", "tiny"} <= set(list_spaces())


@pytest.mark.parametrize(
    "name,lo,hi",
    [("full", 197, 400), ("default", 25, 35), ("tiny", 5, 7)],
)
def test_space_sizes(name, lo, hi):
    space = load_space(name)
    assert space.name == name
    n = len(space.candidates(40, 40, 1))
    assert lo <= n <= hi, n
    # Losing skip is the only difference between a stride-1 same-width layer and others.
    assert len(space.candidates(40, 80, 2)) == n - 1
    assert len(space.candidates(40, 40, 2)) == n - 1


def test_full_space_covers_every_family_and_combination():
    specs = load_space("full").candidates(40, 40, 1)
    derived = set(ops.derived_families())
    assert {ops.parse(s).family for s in specs} == set(ops.families()) - derived
    # Families derived from the teacher's layer are offered on a layer they can change.
    layer = nn.Sequential(nn.Conv2d(40, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 40, 3, 1, 1, bias=False), nn.BatchNorm2d(40))
    with_teacher = load_space("full").candidates(40, 40, 1, layer)
    assert {ops.parse(s).family for s in with_teacher} == set(ops.families())
    assert [s for s in with_teacher if ops.parse(s).family not in derived] == specs
    assert sum(s.startswith("mb_") for s in specs) == 4 * 5 * 2 * 3
    assert sum(s.startswith("fmb_") for s in specs) == 3 * 4 * 2 * 3
    for s in ["mb_k5_e3_se_silu", "mb_k3_e6_relu", "fmb_k3_e4_relu", "ds_k3_se_hswish", "conv_k3_relu",
              "basic_k3_relu", "bottle_k3_e4_relu", "mb_k1_e1_hswish"]:
        assert s in specs


@pytest.mark.parametrize("name", ["full", "default", "tiny"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_candidates_contract(name, shape):
    space = load_space(name)
    cands = space.candidates(*shape)
    assert cands[:2] == ["teacher", "proj"] or {"teacher", "proj"} <= set(cands)
    assert len(cands) == len(set(cands))
    assert ("skip" in cands) == (shape[2] == 1 and shape[0] == shape[1])
    assert all(ops.parse(s).encode() == s for s in cands)
    assert all(ops.is_valid(s, *shape) for s in cands)
    # deterministic: same order on a fresh load, and the order of the pool
    assert load_space(name).candidates(*shape) == cands
    pos = [space.specs.index(s) for s in cands]
    assert pos == sorted(pos)


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_every_candidate_builds_at_a_tiny_shape(name):
    teacher = ops.build("mb_k3_e6_se_silu", 8, 16, 2)
    for shape in [(8, 8, 1), (8, 16, 2)]:
        t = teacher if shape[2] == 2 else ops.build("mb_k3_e6_se_silu", *shape)
        for s in load_space(name).candidates(*shape):
            m = ops.build(s, *shape, teacher_layer=t)
            assert m(torch.randn(1, shape[0], 8, 8)).shape == (1, shape[1], 8 // shape[2], 8 // shape[2])


def test_tiny_space_is_what_tests_expect():
    assert load_space("tiny").candidates(8, 8, 1) == [
        "teacher", "proj", "skip", "mb_k3_e1_relu", "mb_k3_e3_silu", "fmb_k3_e1_relu"
    ]


def test_unknown_space_lists_known_ones():
    with pytest.raises(HantError) as info:
        load_space("huge")
    msg = str(info.value)
    assert "huge" in msg and all(n in msg for n in ["full", "default", "tiny"])


def test_missing_space_file(tmp_path):
    with pytest.raises(HantError, match="not found"):
        load_space(tmp_path / "nope.yaml")


def _write(tmp_path, data, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_yaml_space_file(tmp_path):
    path = _write(tmp_path, {"candidates": ["mb_k3_e6_relu", {"family": "ds", "k": 5, "act": ["relu", "silu"]},
                                            "skip", "mb_k3_e6_relu"]})
    space = load_space(path)
    assert space.name == "mine"
    # teacher and proj are added in front when a file leaves them out; duplicates dropped
    # grid entries vary the last parameter fastest, in the family's token order
    assert space.specs == ("teacher", "proj", "mb_k3_e6_relu", "ds_k5_relu", "ds_k5_silu", "ds_k5_se_relu",
                           "ds_k5_se_silu", "skip")
    assert space.candidates(8, 8, 2) == ["teacher", "proj", "mb_k3_e6_relu", "ds_k5_relu", "ds_k5_silu",
                                         "ds_k5_se_relu", "ds_k5_se_silu"]
    assert load_space(str(path)).specs == space.specs


@pytest.mark.parametrize(
    "candidates,word",
    [
        (["mb_k3_e6_relu", "gc_k3"], "gc"),  # unknown family in a spec
        ([{"family": "gc"}], "gc"),  # unknown family entry
        (["mb_k3_e6_gelu"], "gelu"),  # unknown token
        (["mb_k9_e6_relu"], "k9"),  # bad value
        ([{"family": "mb", "kernel": [3]}], "kernel"),  # unknown parameter
        ([{"family": "mb", "k": [9]}], "9"),  # value the family does not take
        ([{"family": "mb", "se": [1]}], "se"),  # flags take booleans only
        ([{"k": [3]}], "family"),
        ([3], "3"),
        ([], "candidates"),
    ],
)
def test_bad_yaml_names_the_problem(tmp_path, candidates, word):
    path = _write(tmp_path, {"name": "bad", "candidates": candidates})
    with pytest.raises(HantError) as info:
        load_space(path)
    assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_top_level(tmp_path):
    with pytest.raises(HantError, match="canidates"):
        load_space(_write(tmp_path, {"canidates": ["proj"]}))
    with pytest.raises(HantError, match="YAML"):
        load_space(_write(tmp_path, "candidates: [proj\n"))
    with pytest.raises(HantError, match="mapping"):
        load_space(_write(tmp_path, "- proj\n"))


def test_space_with_a_user_family(tmp_path):
    reg = Registry([ops.get_family(n) for n in ("proj", "teacher", "skip")])
    reg.register(ops.Family("pool", lambda i, o, s, k: nn.Sequential(nn.AvgPool2d(k, s, k // 2), nn.Conv2d(i, o, 1)),
                            (Param("k", "int", (3, 5)),)))
    path = _write(tmp_path, {"name": "pools", "candidates": [{"family": "pool"}]})
    space = load_space(path, registry=reg)
    assert isinstance(space, Space) and space.name == "pools"
    assert space.candidates(8, 8, 1) == ["teacher", "proj", "pool_k3", "pool_k5"]
    with pytest.raises(HantError, match="pool"):
        load_space(path)  # the built-in registry does not know it


def test_candidates_rejects_bad_shape():
    with pytest.raises(HantError, match="stride"):
        load_space("tiny").candidates(8, 8, 0)


@pytest.mark.slow
def test_every_full_candidate_builds_with_the_right_shape():
    # One stride-2 shape covers every family but skip (built elsewhere); odd input
    # size catches padding that rounds differently from the teacher's ceil(H / 2).
    teacher = ops.build("mb_k3_e6_se_silu", 8, 16, 2)
    for s in load_space("full").candidates(8, 16, 2):
        ops.build(s, 8, 16, 2, teacher_layer=teacher, in_hw=(7, 7))
