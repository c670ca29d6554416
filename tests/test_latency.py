"""Latency: targets, the timing protocol, the table (resume, fingerprint, prediction, validation).

No test asserts a wall-clock time: they check structure (every entry present, p10 <= median
<= p90), relations (a large conv costs more than a small one on the analytic target), and
what was measured (counted calls).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hant import latency as L
from hant.errors import HantError
from hant.workspace import read_json, write_json

CPU_TARGETS = ["onnxruntime-cpu", "onnxruntime-cpu-int8", "torch-cpu", "analytic"]


def conv_bn_relu(cin=8, cout=16, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _randomise_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(bn.num_features, generator=g))
    return m.eval()


FAST = L.Protocol(warmup=1, min_repeats=5, max_repeats=12, time_cap_s=30.0)


# ---------------------------------------------------------------------------------------------
# Protocol


def test_protocol_gives_complete_stats_for_three_modules():
    target = L.get_target("torch-cpu", batch_size=1, threads=1)
    items = [("a", conv_bn_relu(8, 8, 1), (8, 8, 8)), ("b", conv_bn_relu(8, 16, 3), (8, 8, 8)),
             ("c", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU()), (8, 8, 8))]
    stats = L.measure_modules(items, target, FAST)
    assert set(stats) == {"a", "b", "c"}
    for s in stats.values():
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms
        assert s.ci_lo_ms <= s.median_ms <= s.ci_hi_ms
        assert FAST.min_repeats <= s.n <= FAST.max_repeats and len(s.samples) == s.n
        d = s.to_dict()
        assert {"ci_lo_ms", "ci_hi_ms", "converged"} <= set(d) and "samples" not in d
        json.dumps(d)  # plain JSON values


class _FakeTarget(L.Target):
    """Returns scripted latencies and records the order in which items ran."""

    id = "fake"

    def __init__(self, noise: dict[str, float], batch_size=1, threads=1):
        super().__init__(batch_size, threads)
        self.noise, self.calls = noise, []
        self.rng = np.random.default_rng(0)

    def prepare(self, module, input_shape, example_inputs=None):
        return module  # here a plain key

    def time(self, runnable, n):
        self.calls.extend([runnable] * n)
        return list(1.0 + self.noise[runnable] * self.rng.standard_normal(n))


def test_protocol_interleaves_in_shuffled_rounds_and_stops_when_the_interval_is_narrow():
    target = _FakeTarget({"steady": 0.0, "noisy": 0.5, "other": 0.0})
    proto = L.Protocol(warmup=2, min_repeats=5, max_repeats=40, time_cap_s=60.0)
    stats = L.measure({k: k for k in target.noise}, target, proto)
    # A constant item has a zero-width interval at its first check; a very noisy one never
    # gets within 2% and runs to max_repeats.
    assert stats["steady"].n == proto.min_repeats and stats["steady"].converged
    assert stats["steady"].ci_lo_ms == stats["steady"].median_ms == stats["steady"].ci_hi_ms == 1.0
    assert stats["noisy"].n == proto.max_repeats and not stats["noisy"].converged
    noisy = stats["noisy"]
    assert noisy.ci_lo_ms < noisy.median_ms < noisy.ci_hi_ms
    assert (noisy.ci_hi_ms - noisy.ci_lo_ms) / 2 > proto.rel_tol * noisy.median_ms
    timed = target.calls[2 * 3:]  # after the warm-up calls
    rounds = [timed[i:i + 3] for i in range(0, 3 * stats["steady"].n, 3)]
    assert all(sorted(r) == ["noisy", "other", "steady"] for r in rounds)  # each item once per round
    assert len({tuple(r) for r in rounds}) > 1  # and the order changes between rounds


class _ScriptedTarget(L.Target):
    """Returns, for each item, the next values of its script (the last one repeated)."""

    id = "scripted"

    def __init__(self, scripts: dict[str, list[float]]):
        super().__init__(1, 1)
        self.scripts, self.pos = scripts, dict.fromkeys(scripts, 0)

    def prepare(self, module, input_shape, example_inputs=None):
        return module

    def time(self, runnable, n):
        script, out = self.scripts[runnable], []
        for _ in range(n):
            out.append(script[min(self.pos[runnable], len(script) - 1)])
            self.pos[runnable] += 1
        return out


def test_protocol_stops_at_the_first_check_where_the_interval_is_narrow_enough():
    from hant.latency.protocol import median_ci

    # Noisy for the first 10 samples, then constant: the checks at 5 and 10 samples see a
    # wide interval, later ones see the constant samples outweigh the noise.
    noisy = [1.0, 3.0, 0.5, 2.5, 0.2, 4.0, 0.1, 3.5, 0.3, 2.0]
    target = _ScriptedTarget({"x": noisy + [1.0]})
    proto = L.Protocol(warmup=0, min_repeats=5, max_repeats=200, check_every=5, time_cap_s=60.0)
    s = L.measure({"x": "x"}, target, proto)["x"]
    assert 10 < s.n < proto.max_repeats and (s.n - proto.min_repeats) % proto.check_every == 0
    assert s.converged and (s.ci_hi_ms - s.ci_lo_ms) / 2 <= proto.rel_tol * s.median_ms
    # One check earlier the interval was still too wide.
    med, lo, hi = median_ci(s.samples[:s.n - proto.check_every], proto.confidence, proto.resamples)
    assert (hi - lo) / 2 > proto.rel_tol * med


def test_median_ci_brackets_the_median_and_narrows_with_more_samples():
    from hant.latency.protocol import median_ci

    rng = np.random.default_rng(1)
    few, many = rng.lognormal(0.0, 0.3, 20), rng.lognormal(0.0, 0.3, 2000)
    widths = []
    for a in (few, many):
        med, lo, hi = median_ci(a)
        assert med == pytest.approx(float(np.median(a))) and lo <= med <= hi
        widths.append(hi - lo)
        assert median_ci(a) == (med, lo, hi)  # a fixed seed: the same samples give the same interval
    assert 0 < widths[1] < widths[0] / 3
    assert median_ci([2.0] * 10) == (2.0, 2.0, 2.0) and median_ci([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        median_ci([])


def test_ratio_ci_brackets_the_ratio_of_medians():
    from hant.latency.protocol import ratio_ci

    rng = np.random.default_rng(2)
    teacher, student = 2.0 * rng.lognormal(0.0, 0.1, 200), rng.lognormal(0.0, 0.1, 150)
    r, lo, hi = ratio_ci(teacher, student)
    assert r == pytest.approx(np.median(teacher) / np.median(student))
    assert lo < r < hi and lo < 2.0 < hi and hi - lo < 0.2
    assert ratio_ci([4.0] * 5, [2.0] * 7) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        ratio_ci([1.0], [0.0])


def test_protocol_turn_warmup_runs_untimed_calls_before_each_timed_one():
    target = _FakeTarget({"x": 0.0})
    stats = L.measure({"x": "x"}, target, L.Protocol(warmup=0, min_repeats=5, max_repeats=5, turn_warmup=2))
    assert stats["x"].n == 5 and len(target.calls) == 5 * 3


def test_protocol_time_cap_stops_unfinished_items():
    target = _FakeTarget({"x": 0.5, "y": 0.5})
    stats = L.measure({"x": "x", "y": "y"}, target, L.Protocol(warmup=0, min_repeats=50, max_repeats=100,
                                                                time_cap_s=0.0))
    assert stats["x"].n == stats["y"].n == 1  # one round, then the cap


# ---------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("target_id", CPU_TARGETS)
def test_cpu_target_prepares_and_times_conv_bn_relu(target_id):
    target = L.get_target(target_id, batch_size=2, threads=1)
    assert target.id == target_id
    runnable = target.prepare(_randomise_bn(conv_bn_relu()), (8, 8, 8))
    with target.context():
        times = target.time(runnable, 3)
    assert len(times) == 3 and all(t >= 0 for t in times) and any(t > 0 for t in times)
    fp = target.fingerprint()
    assert fp["target"] == target_id and fp["batch_size"] == 2
    json.dumps(fp)  # it goes into the table as is


def test_onnx_export_folds_batchnorm():
    import onnx

    from hant.onnx_io import export_onnx

    graph = onnx.load_from_string(export_onnx(_randomise_bn(conv_bn_relu()), (8, 8, 8), batch_size=1)).graph
    ops = [n.op_type for n in graph.node]
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_fold_batchnorm_matches_and_keeps_timm_activation():
    from timm.layers import BatchNormAct2d

    x = torch.randn(2, 8, 8, 8)
    plain = _randomise_bn(conv_bn_relu())
    folded = L.fold_batchnorm(plain, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)

    timm_style = _randomise_bn(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                             BatchNormAct2d(16, act_layer=nn.SiLU)))
    folded = L.fold_batchnorm(timm_style, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.SiLU) for m in folded.modules())
    torch.testing.assert_close(folded(x), timm_style(x), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_a_shared_conv_output_alone():
    class Reuse(nn.Module):  # the conv output feeds the batch norm and the sum: folding would be wrong
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = _randomise_bn(Reuse())
    x = torch.randn(1, 8, 8, 8)
    out = L.fold_batchnorm(m, x)
    torch.testing.assert_close(out(x), m(x))
    assert isinstance(out.bn, nn.BatchNorm2d)


def test_torch_cuda_fails_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(HantError, match="CUDA GPU") as e:
        L.get_target("torch-cuda")
    assert "\n" not in str(e.value)


def test_unknown_target_lists_known_ones():
    with pytest.raises(HantError) as e:
        L.get_target("tpu-v9")
    for known in CPU_TARGETS + ["torch-cuda"]:
        assert known in str(e.value)


def test_clock_choice():
    assert L.get_target("onnxruntime-cpu", threads=1).clock == "thread-cpu"
    assert L.get_target("torch-cpu", threads=2).clock == "wall"
    assert L.get_target("torch-cpu", threads=1, clock="wall").fingerprint()["clock"] == "wall"
    with pytest.raises(HantError, match="threads=1"):
        L.get_target("onnxruntime-cpu", threads=2, clock="thread-cpu")
    with pytest.raises(HantError, match="clock"):
        L.get_target("onnxruntime-cpu", clock="sundial")
    with pytest.raises(HantError, match="options"):
        L.get_target("analytic", clock="wall")


def test_registry_refuses_duplicates():
    with pytest.raises(HantError, match="already registered"):
        L.register_target("torch-cpu", lambda **kw: None)


def test_analytic_ranks_large_conv_above_small():
    target = L.get_target("analytic", batch_size=1, peak_gflops=50, bandwidth_gbs=10)
    small = target.prepare(conv_bn_relu(16, 16, 1), (16, 16, 16))
    large = target.prepare(conv_bn_relu(16, 64, 5), (16, 16, 16))
    assert target.time(large, 1)[0] > 5 * target.time(small, 1)[0]
    assert large.detail["flops"] > small.detail["flops"] > 0


# ---------------------------------------------------------------------------------------------
# The table of a run


def make_run(root: Path, include=("blocks.1.*", "blocks.2.*"), space="tiny", size=32,
             source="timm:test_efficientnet") -> Path:
    """A run folder made by `hant init` for a random teacher (timm's 100k-parameter test
    EfficientNet: five MBConv layers, fast to copy and export) on synthetic data."""
    import yaml

    from hant.run import init_run

    config = root / "latency-test.yaml"
    config.write_text(yaml.safe_dump({"latency": {"threads": 1, "warmup": 1, "min_repeats": 3, "max_repeats": 6, "min_time_s": 0.0,
                                                  "time_cap_s": 20.0}}))
    run = root / "run"
    init_run(run, model=source, data="synthetic:64", input_size=size, space=space, include=list(include),
             config=config, random_teacher=True, log=lambda s: None)
    return run


def copy_run(run: Path, dest: Path) -> Path:
    """A second run folder with the same configuration and layers (no latency tables)."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "layers.json"):
        (dest / name).write_bytes((run / name).read_bytes())
    return dest


@pytest.fixture(scope="module")
def analytic_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    table = L.measure_table(run, target="analytic", batch_size=1, validate=3, progress=False, log=lambda s: None)
    return run, table


def _pool(run: Path) -> set[tuple[str, str]]:
    return {(d["name"], s) for d in read_json(run / "layers.json")["layers"] for s in d["candidates"]}


def test_table_covers_every_candidate_and_is_written_atomically(analytic_run):
    run, table = analytic_run
    path = run / "latency" / "analytic.json"
    on_disk = read_json(path)
    assert on_disk["complete"] and on_disk["target"] == "analytic" and on_disk["batch_size"] == 1
    assert {(e["layer"], e["spec"]) for e in on_disk["entries"]} == _pool(run)
    assert len(on_disk["entries"]) == len(_pool(run))
    for e in on_disk["entries"]:
        assert 0 <= e["p10_ms"] <= e["median_ms"] <= e["p90_ms"] and e["n"] >= 3
        assert e["ci_lo_ms"] <= e["median_ms"] <= e["ci_hi_ms"] and e["converged"]  # the roofline is constant
    assert on_disk["fixed_ms"] > 0 and on_disk["teacher_ms"] > on_disk["fixed_ms"]
    lo, hi = on_disk["teacher_ci_ms"]
    assert lo <= on_disk["teacher_ms"] <= hi
    lo, hi = on_disk["fixed_ci_ms"]
    assert lo <= on_disk["fixed_ms"] <= hi
    assert on_disk["fixed"]["cheapest_ms"]["ci_lo_ms"] <= on_disk["fixed"]["cheapest_ms"]["median_ms"]
    assert on_disk["protocol"]["rel_tol"] > 0 and on_disk["protocol"]["confidence"] == 0.95
    for p in on_disk["validation"]["points"]:
        assert p["ci_lo_ms"] <= p["measured_ms"] <= p["ci_hi_ms"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["analytic.json"]  # no temporary file left


def test_predict_is_fixed_plus_sum_and_applies_calibration(analytic_run):
    run, table = analytic_run
    lookup = {(e["layer"], e["spec"]): e["median_ms"] for e in table["entries"]}
    plan = {name: "proj" for name in table["layers"]}
    plan[table["layers"][0]] = "mb_k3_e1_relu"
    expected = table["fixed_ms"] + sum(lookup[(n, s)] for n, s in plan.items())
    uncal = {**table, "calibration": None}
    assert L.predict_ms(uncal, plan) == pytest.approx(expected)
    # Layers left out keep the teacher.
    teacher = table["fixed_ms"] + sum(lookup[(n, "teacher")] for n in table["layers"])
    assert L.predict_ms(uncal, {}) == pytest.approx(teacher)
    cal = {**table, "calibration": {"kind": "linear", "a": 2.0, "b": 0.5}}
    assert L.predict_ms(cal, plan) == pytest.approx(2 * expected + 0.5)
    # The additive form the selection uses gives the same number.
    fixed, costs = L.entry_costs(cal)
    assert fixed + sum(costs[(n, s)] for n, s in plan.items()) == pytest.approx(2 * expected + 0.5)
    assert len(costs) == len(table["entries"])
    scaled = {**table, "calibration": {"kind": "scale", "fixed_scale": 1.0, "a": 1.5, "b": 0.0}}
    sum_entries = expected - table["fixed_ms"]
    assert L.predict_ms(scaled, plan) == pytest.approx(table["fixed_ms"] + 1.5 * sum_entries)
    fixed, costs = L.entry_costs(scaled)
    assert fixed + sum(costs[(n, s)] for n, s in plan.items()) == pytest.approx(table["fixed_ms"] + 1.5 * sum_entries)
    with pytest.raises(HantError):
        L.predict_ms(uncal, {"no.such.layer": "proj"})
    with pytest.raises(HantError):
        L.predict_ms(uncal, {table["layers"][0]: "mb_k7_e9_relu"})


def test_calibration_is_kept_only_when_it_helps_held_out():
    from hant.latency.model import _choose_calibration

    rng = np.random.default_rng(0)
    fixed, sums = 1.0, rng.uniform(2.0, 10.0, 30)
    # Entries timed alone 20% too fast: a scale on the entries explains it exactly.
    cal, held_out, scores = _choose_calibration(fixed, sums, fixed + 1.2 * sums)
    assert cal is not None and cal["kind"] in ("scale", "linear")
    assert scores[cal["kind"]]["max"] < 1e-6 < scores["none"]["median"]
    np.testing.assert_allclose(held_out, fixed + 1.2 * sums)
    # Unbiased noise: nothing to correct, no calibration.
    cal, held_out, _ = _choose_calibration(fixed, sums, (fixed + sums) * (1 + 0.02 * rng.standard_normal(30)))
    assert cal is None
    np.testing.assert_allclose(held_out, fixed + sums)


def test_analytic_validation_is_exact(analytic_run):
    # The roofline is additive over operations, so the table model must reproduce the
    # end-to-end estimate: this checks network assembly, fixed part and prediction together.
    _, table = analytic_run
    v = table["validation"]
    assert v["k"] == 3 and v["samples"] == 5
    assert v["median_abs_pct_error"] < 0.5 and v["max_abs_pct_error"] < 1.0
    assert v["kendall_tau"] > 0.9
    kinds = [p["kind"] for p in v["points"]]
    assert kinds[:2] == ["teacher", "cheapest"] and kinds.count("random") == 3


def test_resume_measures_only_missing_entries(analytic_run, tmp_path, monkeypatch):
    run, table = analytic_run
    other = copy_run(run, tmp_path / "copy")
    partial = read_json(run / "latency" / "analytic.json")
    removed = [e for e in partial["entries"] if e["layer"] == partial["layers"][-1]][:2]
    partial["entries"] = [e for e in partial["entries"] if e not in removed]
    partial["fixed_ms"] = None
    write_json(other / "latency" / "analytic.json", partial)

    from hant.latency.analytic import Analytic

    prepared = []
    original = Analytic.prepare

    def counting(self, module, input_shape, example_inputs=None):
        prepared.append(type(module).__name__)
        return original(self, module, input_shape, example_inputs)

    monkeypatch.setattr(Analytic, "prepare", counting)
    out = L.measure_table(other, target="analytic", batch_size=1, progress=False, log=lambda s: None)
    # The two removed candidates, the layer's identity, then the two networks of the fixed part.
    assert len(prepared) == len(removed) + 1 + 2
    assert prepared.count("Identity") == 1 and prepared.count("EfficientNet") == 2
    assert {(e["layer"], e["spec"]) for e in out["entries"]} == _pool(other)
    prepared.clear()
    L.measure_table(other, target="analytic", batch_size=1, progress=False, log=lambda s: None)
    assert prepared == []  # complete: nothing to measure


def test_a_candidate_the_exporter_cannot_take_is_listed_as_failed(analytic_run, tmp_path, monkeypatch):
    from hant.latency.analytic import Analytic
    from hant.onnx_io import OnnxExportError

    run, _ = analytic_run
    other = copy_run(run, tmp_path / "copy")
    original, calls = Analytic.prepare, []

    def first_fails(self, module, input_shape, example_inputs=None):
        calls.append(module)
        if len(calls) == 1:  # the first candidate of the first layer
            try:
                raise RuntimeError("Unsupported: onnx::Frobnicate")
            except RuntimeError as e:
                raise OnnxExportError("ONNX export failed") from e
        return original(self, module, input_shape, example_inputs)

    monkeypatch.setattr(Analytic, "prepare", first_fails)
    out = L.measure_table(other, target="analytic", batch_size=1, progress=False, log=lambda s: None)
    assert out["complete"] and len(out["failed"]) == 1
    assert out["failed"][0]["error"] == "RuntimeError: Unsupported: onnx::Frobnicate"  # the exporter's own words
    assert len(out["entries"]) == len(_pool(other)) - 1


def test_a_user_error_while_preparing_stops_the_table(analytic_run, tmp_path, monkeypatch):
    from hant.latency.analytic import Analytic

    run, _ = analytic_run
    other = copy_run(run, tmp_path / "copy")

    def refuses(self, module, input_shape, example_inputs=None):
        raise HantError("fix the target's settings")

    monkeypatch.setattr(Analytic, "prepare", refuses)
    with pytest.raises(HantError, match="fix the target"):
        L.measure_table(other, target="analytic", batch_size=1, progress=False, log=lambda s: None)


def test_interrupted_build_leaves_a_partial_table_that_resumes(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    from hant.latency.analytic import Analytic

    original = Analytic.prepare
    layers_seen = []

    def failing(self, module, input_shape, example_inputs=None):
        layers_seen.append(tuple(input_shape))
        if len(set(layers_seen)) > 1:  # the second layer's shape: stop as a kill would
            raise KeyboardInterrupt
        return original(self, module, input_shape, example_inputs)

    monkeypatch.setattr(Analytic, "prepare", failing)
    with pytest.raises(KeyboardInterrupt):
        L.measure_table(run, target="analytic", progress=False, log=lambda s: None)
    partial = read_json(run / "latency" / "analytic.json")
    first = partial["layers"][0]
    assert not partial["complete"] and partial["fixed_ms"] is None
    assert {e["layer"] for e in partial["entries"]} == {first}
    with pytest.raises(HantError, match="incomplete"):
        L.load_table(run, "analytic")
    monkeypatch.setattr(Analytic, "prepare", original)
    done = L.measure_table(run, target="analytic", progress=False, log=lambda s: None)
    assert done["complete"] and {(e["layer"], e["spec"]) for e in done["entries"]} == _pool(run)


def test_fingerprint_mismatch_is_refused_unless_forced(analytic_run, tmp_path):
    run, _ = analytic_run
    other = copy_run(run, tmp_path / "copy")
    table = read_json(run / "latency" / "analytic.json")
    table["fingerprint"]["peak_gflops"] = 1.0  # measured "elsewhere"
    write_json(other / "latency" / "analytic.json", table)
    with pytest.raises(HantError, match="--force") as e:
        L.measure_table(other, target="analytic", progress=False, log=lambda s: None)
    assert "peak_gflops" in str(e.value) and "\n" not in str(e.value)
    out = L.measure_table(other, target="analytic", force=True, progress=False, log=lambda s: None)
    assert out["previous_fingerprint"]["peak_gflops"] == 1.0
    assert len(out["entries"]) == len(table["entries"])


def test_table_naming_and_loading(analytic_run, tmp_path):
    run, _ = analytic_run
    assert L.table_id("onnxruntime-cpu", 1) == "onnxruntime-cpu"
    assert L.table_id("onnxruntime-cpu", 64) == "onnxruntime-cpu-b64"
    assert L.table_path(run, "analytic", 8) == run / "latency" / "analytic-b8.json"
    assert L.load_table(run, "analytic")["batch_size"] == 1
    assert L.load_table(run, "analytic", batch_size=1)["table_id"] == "analytic"
    with pytest.raises(HantError, match="hant latency"):
        L.load_table(run, "torch-cpu")
    # A target with only a batch-4 table resolves by its id alone; with two, it must be named.
    t4 = {**read_json(run / "latency" / "analytic.json"), "batch_size": 4, "table_id": "analytic-b4"}
    lone = tmp_path / "lone"
    write_json(lone / "latency" / "analytic-b4.json", t4)
    assert L.load_table(lone, "analytic")["batch_size"] == 4
    assert L.load_table(lone, "analytic-b4")["batch_size"] == 4
    write_json(lone / "latency" / "analytic-b8.json", {**t4, "batch_size": 8, "table_id": "analytic-b8"})
    with pytest.raises(HantError, match="several"):
        L.load_table(lone, "analytic")


def test_cli_builds_an_analytic_table(analytic_run, tmp_path, capsys):
    from hant.cli import main

    run, _ = analytic_run
    other = copy_run(run, tmp_path / "copy")
    assert main(["latency", "--run", str(other), "--target", "analytic", "--batch-size", "2"]) == 0
    assert read_json(other / "latency" / "analytic-b2.json")["complete"]
    assert main(["latency", "--run", str(other), "--target", "nope"]) == 2
    assert "known targets" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("target_id", ["onnxruntime-cpu", "torch-cpu"])
def test_measured_table_and_validation_end_to_end(tmp_path, target_id):
    run = make_run(tmp_path)
    table = L.measure_table(run, target=target_id, batch_size=1, validate=3, progress=False, log=lambda s: None)
    assert {(e["layer"], e["spec"]) for e in table["entries"]} == _pool(run)
    v = table["validation"]
    assert v["samples"] == 5 and len(v["points"]) == 5
    for p in v["points"]:
        assert p["measured_ms"] > 0 and p["predicted_ms"] > 0
        assert p["p10_ms"] <= p["measured_ms"] <= p["p90_ms"]
        assert p["ci_lo_ms"] <= p["measured_ms"] <= p["ci_hi_ms"]
    assert -1.0 <= v["kendall_tau"] <= 1.0
    assert v["median_abs_pct_error"] <= v["max_abs_pct_error"]
    assert set(table["overheads"]) == set(table["layers"])
    assert all(o["median_ms"] > 0 for o in table["overheads"].values())
    assert table["fixed_ms"] >= 0 and table["teacher_ms"] > 0


@pytest.mark.slow
def test_int8_table_is_calibrated_on_real_layer_inputs(tmp_path):
    run = make_run(tmp_path, include=("blocks.2.0",))
    table = L.measure_table(run, target="onnxruntime-cpu-int8", batch_size=1, progress=False, log=lambda s: None)
    assert table["quant_calibration"].startswith("real")
    # The scheme is the one measured for this machine and recorded beside the table.
    choice = read_json(run / "latency" / f"int8_scheme-b1-t{table['fingerprint']['threads']}.json")
    assert table["fingerprint"]["int8_scheme"] == choice["scheme"]
    assert {(e["layer"], e["spec"]) for e in table["entries"]} == _pool(run)


def test_protocol_keeps_timing_until_its_minimum_time_has_passed():
    class Instant(L.Target):
        id = "instant"

        def prepare(self, module, input_shape, example_inputs=None):
            return module

        def time(self, runnable, n):
            return [1.0] * n  # constant: converged at the first check

    target = Instant(threads=1)
    quick = L.measure({"x": "x"}, target, L.Protocol(warmup=0, min_repeats=5, max_repeats=10))
    assert quick["x"].n == 5
    slow = L.measure({"x": "x"}, target, L.Protocol(warmup=0, min_repeats=5, max_repeats=10, min_time_s=0.2))
    assert slow["x"].n > 10 and slow["x"].converged  # past max_repeats, until 0.2 s had passed
    capped = L.measure({"x": "x"}, target, L.Protocol(warmup=0, min_repeats=5, max_repeats=10, min_time_s=60,
                                                      time_cap_s=0.1))
    assert capped["x"].n > 10  # the time cap still ends it, long before the minimum
    from hant.config import LatencyConfig

    assert L.Protocol.from_config(LatencyConfig()).min_time_s == LatencyConfig().min_time_s > 0


def test_covers_pools_needs_every_candidate_of_the_run():
    from hant.latency import covers_pools

    table = {"complete": True, "entries": [{"layer": "a", "spec": "x"}], "failed": [{"layer": "a", "spec": "y"}]}
    assert covers_pools(table, {"a": ["x", "y"]})  # a recorded failure counts: it is not measured again
    assert not covers_pools(table, {"a": ["x", "z"]})  # the space grew: a hole
    assert not covers_pools({**table, "complete": False}, {"a": ["x"]})
