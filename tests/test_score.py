import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hant.score import Suffix, count_flops, layer_input, replacement_scores


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Tiny(nn.Module):
    """Stem, nested Sequential stages of blocks, functional pooling, linear head (timm-like)."""

    def __init__(self, residual=False):
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(1, 4, 3, 1, 1)
        self.blocks = nn.Sequential(nn.Sequential(Block(4, 4), Block(4, 8, 2)), nn.Sequential(Block(8, 8)))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        out = self.head(self.blocks(s).mean((2, 3)))
        if self.residual:
            # A long skip connection from the stem to the head: the suffix needs the prefix's value.
            out = out + s.mean((1, 2, 3))[:, None]
        return out


def _model(residual=False, seed=0):
    torch.manual_seed(seed)
    m = Tiny(residual).eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial statistics so that layers differ
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def _full_with(model, name, module, x):
    m = copy.deepcopy(model)
    parent, _, leaf = name.rpartition(".")
    setattr(m.get_submodule(parent), leaf, module)
    return m(x)


def test_layer_input_matches_full_forward_capture():
    m = _model()
    x = torch.randn(5, 1, 8, 8)
    seen = []
    h = m.blocks[0][1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m(x)
    h.remove()
    assert torch.equal(layer_input(m, "blocks.0.1", x), seen[0])


@pytest.mark.parametrize("name,cin,cout,stride", [("blocks.0.0", 4, 4, 1), ("blocks.0.1", 4, 8, 2),
                                                  ("blocks.1.0", 8, 8, 1)])
def test_suffix_equals_full_forward_with_candidate(name, cin, cout, stride):
    m = _model()
    x = torch.randn(6, 1, 8, 8)
    suffix = Suffix(m, name, x)
    assert suffix.mode == "suffix"
    # Modules before the layer are skipped: the stem never runs in a suffix call.
    x_layer = layer_input(m, name, x)
    calls = []
    h = m.stem.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1)
    cand = Block(cin, cout, stride).eval()
    got = suffix(x, x_layer, cand)
    h.remove()
    assert calls == []
    with torch.no_grad():
        want = _full_with(m, name, cand, x)
    assert torch.allclose(got, want, atol=1e-5)
    assert isinstance(m.stem, nn.Conv2d) and m.get_submodule(name) is not cand  # model restored


def test_suffix_falls_back_to_full_forward_around_a_skip_connection():
    m = _model(residual=True)
    x = torch.randn(4, 1, 8, 8)
    suffix = Suffix(m, "blocks.0.1", x)
    assert suffix.mode == "full"
    torch.manual_seed(2)
    cand = Block(4, 8, 2).eval()
    with torch.no_grad():
        want = _full_with(m, "blocks.0.1", cand, x)
    assert torch.allclose(suffix(x, layer_input(m, "blocks.0.1", x), cand), want, atol=1e-5)


def _batches(n=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def test_replacement_scores_teacher_layer_is_zero_and_values_match_direct_computation():
    m = _model()
    batches = _batches()
    torch.manual_seed(3)
    other = Block(4, 8, 2).eval()
    res = replacement_scores(m, "blocks.0.1", {"teacher": copy.deepcopy(m.blocks[0][1]), "other": other}, batches)
    assert res["teacher"]["d_loss"] == pytest.approx(0.0, abs=1e-6)
    assert res["teacher"]["d_acc"] == 0.0
    assert res["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        t, s = m(x), _full_with(m, "blocks.0.1", other, x)
    want_loss = float(F.cross_entropy(s, y) - F.cross_entropy(t, y))
    want_acc = 100.0 * float((s.argmax(1) == y).float().mean() - (t.argmax(1) == y).float().mean())
    want_kl = float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))
    assert want_kl > 1e-4  # the candidate really differs
    assert res["other"]["d_loss"] == pytest.approx(want_loss, abs=1e-5)
    assert res["other"]["d_acc"] == pytest.approx(want_acc, abs=1e-6)
    assert res["other"]["kl"] == pytest.approx(want_kl, rel=1e-4)


def test_replacement_scores_nonfinite_candidate_gives_none():
    m = _model()

    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 8, 4, 4), float("nan"))

    res = replacement_scores(m, "blocks.0.1", {"nan": Nan()}, _batches(1))
    assert res["nan"] == {"d_loss": None, "d_acc": None, "kl": None}


def test_count_flops_conv():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (4, 6, 6)) == 2 * 4 * 8 * 9 * 36


# ---------------------------------------------------------------------------------------------
# The stage, on a tiny run folder (timm test_efficientnet, synthetic data; see student_run.py)

def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from student_run import make_run

    return make_run(tmp_path_factory.mktemp("score") / "run", images=120)


def test_score_stage_end_to_end_and_resume(tiny_run, monkeypatch):
    import hant.score as score_mod
    from hant.config import RunConfig
    from hant.data import load_data
    from hant.layers import get_layer, set_layer
    from hant.ops import build
    from hant.teacher import load_teacher
    from hant.workspace import RunDir, load_safetensors, read_json, write_json

    rd = RunDir(tiny_run)
    index = read_json(rd.candidates_index)["candidates"]
    layers = read_json(rd.layers)["layers"]
    out = score_mod.score(tiny_run, log=_quiet)
    assert out["method"] == "eval" and out["images"] == 16
    got = {(e["layer"], e["spec"]): e for e in read_json(rd.scores)["entries"]}
    for d in layers:  # the teacher candidate scores exactly zero
        t = got[(d["name"], "teacher")]
        assert (t["d_loss"], t["d_acc"], t["kl"]) == (0.0, 0.0, 0.0) and t["params"] == d["params"]
    for e in index:
        g = got[(e["layer"], e["spec"])]
        assert g["status"] == "done" and g["kl"] > 0 and g["params"] > 0 and g["flops"] > 0

    # d_loss of one candidate equals the held-out loss of the teacher with that layer swapped.
    cfg = RunConfig.load(rd.config)
    e = index[-1]
    d = next(d for d in layers if d["name"] == e["layer"])
    teacher = load_teacher(cfg.model.source, cfg.data.in_chans, cfg.data.num_classes, cfg.model.checkpoint)
    cand = build(e["spec"], d["in_chs"], d["out_chs"], d["stride"], get_layer(teacher, e["layer"]))
    cand.load_state_dict(load_safetensors(rd.root / e["file"]))
    held = load_data(cfg.data).heldout
    x, y = held.get_batch(torch.arange(len(held)))
    with torch.no_grad():
        base = F.cross_entropy(teacher(x), y)
        set_layer(teacher, e["layer"], cand.eval())
        swapped = F.cross_entropy(teacher(x), y)
    assert got[(e["layer"], e["spec"])]["d_loss"] == pytest.approx(float(swapped - base), abs=1e-4)

    # Resume: drop one entry; a rerun scores only that one and keeps the others as they were.
    sc = read_json(rd.scores)
    dropped = next(x for x in sc["entries"] if x["spec"] != "teacher")
    sc["entries"] = [x for x in sc["entries"] if x is not dropped]
    write_json(rd.scores, sc)
    seen = []
    real = score_mod.replacement_scores

    def counting(model, name, candidates, *a, **k):
        seen.extend(candidates)
        return real(model, name, candidates, *a, **k)

    monkeypatch.setattr(score_mod, "replacement_scores", counting)
    again = score_mod.score(tiny_run, log=_quiet)
    assert seen == [dropped["spec"]]
    new = {(x["layer"], x["spec"]): x for x in again["entries"]}
    assert new[(dropped["layer"], dropped["spec"])]["d_loss"] == pytest.approx(dropped["d_loss"], abs=1e-6)
    assert all(new[k] == v for k, v in got.items() if k != (dropped["layer"], dropped["spec"]))


def test_select_on_scored_run_with_a_measured_table(tiny_run):
    # Integration: scores from this stage, a latency table from the latency stage (analytic
    # target, no hardware), then the selection stage with --speedup and --sweep.
    from hant.latency import load_table, measure_table, predict_ms
    from hant.score import score
    from hant.select import select
    from hant.workspace import RunDir, read_json, write_json

    rd = RunDir(tiny_run)
    if not rd.scores.exists():
        score(tiny_run, log=_quiet)
    lj = read_json(rd.layers)
    index = read_json(rd.candidates_index)["candidates"]
    for d in lj["layers"]:  # the pools that make_run trained
        d["candidates"] = ["teacher"] + [e["spec"] for e in index if e["layer"] == d["name"]]
    write_json(rd.layers, lj)
    measure_table(tiny_run, target="analytic", batch_size=1)
    table = load_table(tiny_run, "analytic")
    plan = select(tiny_run, target="analytic", speedup=1.3, sweep=True, sweep_points=4, log=_quiet)
    assert plan["name"] == "analytic-x1.3" and rd.plan("analytic-x1.3").exists()
    assert plan["teacher_ms"] == pytest.approx(table["teacher_ms"]) and plan["teacher_ms_source"] == "measured"
    assert plan["predicted_ms"] <= table["teacher_ms"] / 1.3 + 1e-12
    assert plan["predicted_ms"] == pytest.approx(predict_ms(table, plan["layers"]))
    assert any(p["pareto"] and rd.plan(p["name"]).exists() for p in plan["sweep"])
    assert (rd.root / "pareto_select.png").exists()


def test_score_distill_method_uses_phase1_loss(tiny_run):
    from hant.score import score
    from hant.workspace import RunDir, read_json

    out = score(tiny_run, method="distill", log=_quiet)
    index = read_json(RunDir(tiny_run).candidates_index)["candidates"]
    got = {(e["layer"], e["spec"]): e for e in out["entries"]}
    assert out["method"] == "distill"
    for e in index:
        g = got[(e["layer"], e["spec"])]
        assert g["d_loss"] == e["heldout_loss"] and g["d_acc"] is None and g["kl"] is None and g["params"] > 0
    assert all(g["d_loss"] == 0.0 for (l, s), g in got.items() if s == "teacher")


def test_score_refuses_unknown_method_and_missing_phase1(tmp_path, tiny_run):
    from hant.errors import HantError
    from hant.score import score

    with pytest.raises(HantError, match="unknown score method"):
        score(tiny_run, method="bogus", log=_quiet)
    with pytest.raises(HantError, match="hant init"):
        score(tmp_path / "nothing", log=_quiet)
