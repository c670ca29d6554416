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
