"""The headline benchmark's latency matching (bench/headline.py), with FLOPs standing in for latency."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

from hant.student import count_params_flops  # noqa: E402
from hant.teacher import create_model  # noqa: E402

SHAPE = (1, 32, 32)


def _headline():
    path = Path(__file__).resolve().parents[1] / "bench" / "headline.py"
    spec = importlib.util.spec_from_file_location("headline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_match_latency_finds_the_parameter_on_a_smooth_curve():
    hl = _headline()
    calls = []

    def ratio(p):  # latency falls as (1 - p)^2, the reference sits at p = 0.37
        calls.append(p)
        return ((1 - p) / (1 - 0.37)) ** 2

    m = hl.match_latency(ratio, 0.0, 0.6, tol=0.01, steps=8)
    assert m["reached"] and abs(m["ratio"] - 1) <= 0.01 and abs(m["param"] - 0.37) < 0.01
    assert len(m["probes"]) == len(calls) <= 8
    # Out of reach even after growing the bound: the closest probe, flagged.
    far = hl.match_latency(lambda p: 5.0 - p, 0.0, 0.6, steps=5, grow=lambda h: None if h >= 0.95 else 0.95)
    assert not far["reached"] and far["param"] == 0.95 and [q["param"] for q in far["probes"]] == [0.0, 0.6, 0.95]


def test_pruning_ratio_search_hits_a_flops_target():
    hl = _headline()
    teacher = create_model("timm:test_efficientnet", 1, 10).eval()
    _, t_flops = count_params_flops(teacher, SHAPE)
    goal = t_flops / 2.5  # "latency" = FLOPs; the reference network is 2.5x cheaper than the teacher

    def ratio(p):
        return count_params_flops(hl.prune(teacher, p, SHAPE, 10, round_to=None), SHAPE)[1] / goal

    m = hl.match_latency(ratio, 0.0, 0.6, tol=0.03, steps=8,
                         grow=lambda h: None if h >= 0.95 else min(0.95, h + 0.2))
    assert m["reached"], m
    pruned = hl.prune(teacher, m["param"], SHAPE, 10, round_to=None)
    # Pruned, not rebuilt: the classifier still has 10 outputs and the network runs and learns.
    x = torch.randn(4, *SHAPE)
    assert pruned(x).shape == (4, 10)
    pruned.train()
    pruned(x).sum().backward()
    assert math.isclose(count_params_flops(pruned, SHAPE)[1] / goal, m["ratio"])
    # Deterministic: the same ratio prunes the same channels, so saved weights load into a rebuild.
    again = hl.prune(teacher, m["param"], SHAPE, 10, round_to=None)
    again.load_state_dict(pruned.state_dict(), strict=True)


def test_smaller_efficientnet_search_hits_a_flops_target():
    hl = _headline()
    _, t_flops = count_params_flops(hl.scaled_model("timm:test_efficientnet", 0.0, 1, 10), SHAPE)
    goal = t_flops / 3

    def ratio(p):
        return count_params_flops(hl.scaled_model("timm:test_efficientnet", -p, 1, 10), SHAPE)[1] / goal

    m = hl.match_latency(ratio, 0.0, 4.0, tol=0.1, steps=10, grow=lambda h: None if h >= 24 else h * 1.6)
    # Channel counts are rounded to multiples of 8, so FLOPs move in steps: the closest is within a step.
    assert abs(math.log(m["ratio"])) < math.log(1.25), m
    small = hl.scaled_model("timm:test_efficientnet", -m["param"], 1, 10)
    assert small(torch.randn(2, *SHAPE)).shape == (2, 10)
    with pytest.raises(Exception, match="EfficientNet"):
        hl.scaled_model("timm:resnet18", -1.0, 1, 10)


def test_alternatives_timed_at_another_batch_are_not_matched_comparisons():
    hl = _headline()
    hant = {"unit": "hant-b1-x2", "method": "hant", "batch_size": 1}
    alt64 = [{"unit": "hant-b64-x2", "method": "hant", "batch_size": 64},
             {"unit": "pruned-b64-x2", "method": "pruned", "batch_size": 64, "matched_to": "hant-b64-x2",
              "match": {"reached": False}},
             {"unit": "hant-int8-b64-x2", "method": "hant-int8", "batch_size": 64}]
    extra = hl.timed_only(alt64)
    # Only the alternatives travel, keeping where they were matched and losing what they were matched to.
    assert [u["unit"] for u in extra] == ["pruned-b64-x2"]
    assert extra[0]["matched_to"] is None and extra[0]["matched_at_batch"] == 64
    assert alt64[1]["matched_to"] == "hant-b64-x2"  # the batch-64 unit itself is untouched

    def row(u, b, top1, ms):
        return {**u, "batch_size": b, "top1": top1, "latency_ms": ms, "speedup_target": 2.0}

    rows = [row(alt64[0], 64, 90.0, 10.0), row(alt64[1], 64, 88.5, 10.2),
            row(hant, 1, 89.0, 1.0), row(extra[0], 1, 88.5, 1.3)]
    comps = hl.comparisons(rows)
    assert len(comps) == 1 and comps[0]["batch_size"] == 64
    assert math.isclose(comps[0]["hant_minus_method"], 1.5) and comps[0]["hant_leads_by_1_point"]
