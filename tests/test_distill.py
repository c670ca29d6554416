"""Phase 1: teacher init, the distillation engine, the stage on a run folder, resume and torchrun."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from hant import ops
from hant.distill import distill
from hant.errors import HantError
from hant.layerwise import BatchPlan, LayerTap, candidate_seed
from hant.phase1 import Candidate, Phase1Options, measure_candidate, pack_groups, partition, train_pool
from hant.teacher_init import INIT_PARTIAL, INIT_RANDOM, INIT_TEACHER, init_from_teacher
from hant.workspace import FAULT_EXIT_CODE, fault_point, read_json, sha256_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: two OpenMP threads fighting other processes for two
    # cores are tens of times slower than one, and one thread is also bit-reproducible
    # across processes (the resume and torchrun tests compare against in-process runs).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _calibrate(net: nn.Module, in_chs: int, size: int, seed: int = 0, images: torch.Tensor | None = None) -> nn.Module:
    """Give BatchNorm running statistics of the data it will see (as a trained network has), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for i in range(4):
            net(images[i * 64 : (i + 1) * 64] if images is not None else torch.randn(64, in_chs, size, size, generator=g))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


def small_teacher(in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """An EfficientNet in miniature, from timm blocks: a DS block and two MBConv blocks.

    Deterministic (seeded, without touching the global RNG), so every process that builds
    it gets the same teacher; its batch norms hold the statistics of the test data.
    """
    from hant.config import DataConfig
    from hant.data import load_data

    images = load_data(DataConfig(spec="synthetic:600", input_size=16, in_chans=in_chans)).train.get_batch(
        torch.arange(256))[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_chans, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
            blocks=nn.Sequential(
                nn.Sequential(ops.build("ds_k3_se_silu", 8, 8, 1)),
                nn.Sequential(ops.build("mb_k3_e3_se_silu", 8, 16, 2), ops.build("mb_k3_e3_se_silu", 16, 16, 1)),
            ),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)),
        ))
        return _calibrate(net, in_chans, 16, images=images)


def _randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module.eval()


def _nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


# ----------------------------------------------------------------------------- teacher init


@torch.no_grad()
def _init_error(spec: str, teacher_spec: str = "mb_k3_e4_se_silu", sample: bool = False) -> tuple[str, float]:
    torch.manual_seed(0)
    teacher = _randomise_bn(ops.build(teacher_spec, 16, 16, 1))
    cand = ops.build(spec, 16, 16, 1)
    x = torch.randn(8, 16, 8, 8)
    init = init_from_teacher(cand, teacher, x if sample else None)
    return init, _nmse(cand.eval()(x), teacher(x))


@pytest.mark.parametrize("spec", ["mb_k3_e4_se_silu", "mb_k5_e4_se_silu", "mb_k5_e6_se_silu"])
def test_teacher_init_is_exact_when_it_only_pads(spec):
    # Same block, or a larger kernel (zero-padded) / more channels (zero-read): same function.
    init, err = _init_error(spec)
    assert init == INIT_TEACHER
    assert err < 1e-10


def test_teacher_init_smaller_kernel_and_expansion_start_close():
    init_k, err_k = _init_error("mb_k3_e4_se_silu", teacher_spec="mb_k5_e4_se_silu")
    init_e, err_e = _init_error("mb_k3_e2_se_silu")
    _, err_random = _init_error("fmb_k3_e2_silu")
    assert init_k == INIT_PARTIAL and init_e == INIT_PARTIAL
    assert err_k < 0.5 * err_random and err_e < 0.5 * err_random


def test_teacher_init_keeps_the_most_important_channels():
    torch.manual_seed(0)
    teacher = _randomise_bn(ops.build("mb_k3_e4_se_silu", 16, 16, 1))
    # Make channels 5 and 40 of the 64 expanded channels dominate the output.
    teacher.conv_pwl.weight.data[:, [5, 40]] *= 50
    cand = ops.build("mb_k3_e1_se_silu", 16, 16, 1)
    init_from_teacher(cand, teacher)
    kept = cand.conv_pwl.weight.data
    assert torch.equal(kept[:, 0], teacher.conv_pwl.weight.data[:, 5]) or torch.equal(
        kept[:, 1], teacher.conv_pwl.weight.data[:, 5])
    assert any(torch.equal(kept[:, i], teacher.conv_pwl.weight.data[:, 40]) for i in range(16))


def test_teacher_init_se_removed_folds_the_mean_gate():
    init_plain, err_plain = _init_error("mb_k3_e4_silu")
    init_fold, err_fold = _init_error("mb_k3_e4_silu", sample=True)
    assert init_plain == init_fold == INIT_PARTIAL
    assert err_fold < 0.2 * err_plain


def test_teacher_init_with_another_se_width_copies_the_rest():
    # MobileNetV3's SE squeezes the expanded channels (here to 16), hant's the block's input
    # (to 4): the SE does not correspond, everything else does, at any expansion.
    import timm

    torch.manual_seed(0)
    m = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    teacher = m.blocks[2][0]
    x = torch.randn(4, teacher.conv_pw.in_channels, 8, 8)
    for spec in ("mb_k5_e6_se_hswish", "mb_k5_e2_se_hswish"):
        cand = ops.build(spec, teacher.conv_pw.in_channels, teacher.conv_pwl.out_channels, 2)
        assert init_from_teacher(cand, teacher, x) == INIT_PARTIAL
        if "e6" in spec:  # more expanded channels: the teacher's 64 come first, unchanged
            assert torch.equal(cand.conv_dw.weight[:64], teacher.conv_dw.weight)
        assert cand.se.conv_reduce.weight.shape != teacher.se.conv_reduce.weight.shape


def test_teacher_init_other_block_is_random():
    cand = ops.build("conv_k3_relu", 16, 16, 1)
    before = {k: v.clone() for k, v in cand.state_dict().items()}
    assert init_from_teacher(cand, ops.build("mb_k3_e4_se_silu", 16, 16, 1)) == INIT_RANDOM
    assert all(torch.equal(before[k], v) for k, v in cand.state_dict().items())


# ----------------------------------------------------------------------------- engine pieces


def test_batch_plan_is_a_function_of_seed_and_step():
    a, b = BatchPlan(100, 32, seed=3), BatchPlan(100, 32, seed=3)
    seq = [a.indices(s) for s in range(9)]
    assert all(len(i) == 32 for i in seq)
    assert torch.equal(b.indices(7), seq[7])  # random access, e.g. after a resume
    epoch0 = torch.cat(seq[:3])
    assert len(set(epoch0.tolist())) == 96  # no repeats inside an epoch
    assert not torch.equal(seq[0], seq[3])  # a new permutation each epoch
    assert not torch.equal(BatchPlan(100, 32, seed=4).indices(0), seq[0])
    assert BatchPlan(10, 32, seed=0).batch_size == 10


def test_candidate_seed_depends_on_identity_only():
    assert candidate_seed(0, "l", "a") == candidate_seed(0, "l", "a")
    assert len({candidate_seed(0, "l", "a"), candidate_seed(1, "l", "a"), candidate_seed(0, "m", "a"),
                candidate_seed(0, "l", "b"), candidate_seed(0, "l", "a", step=3)}) == 5


def _cand(name, state, act, layer="l"):
    c = Candidate(layer, name, nn.Identity())
    c.state_bytes, c.act_bytes = state, act
    return c


def test_pack_groups_respects_the_budget():
    cands = [_cand(str(i), 100, 10) for i in range(10)]
    assert pack_groups(cands, None, 4) == [list(range(10))]
    groups = pack_groups(cands, 340, 4)  # 3 x 100 + 10 x 4 = 340 fits, 4 do not
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # Too big on its own: a group of its own, never dropped.
    assert pack_groups([_cand("a", 1000, 0), _cand("b", 1, 0)], 10, 1) == [[0], [1]]
    # The captured teacher tensors count too.
    assert pack_groups(cands[:2], 300, 4, layer_bytes={"l": 20}) == [[0], [1]]


def test_partition_balances_cost():
    costs = [10, 1, 1, 1, 9, 2, 8, 3]
    shares = partition(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 2
    assert partition(costs, 2) == shares  # deterministic


def test_measure_candidate_counts_memory_and_keeps_weights():
    torch.manual_seed(0)
    m = ops.build("mb_k3_e4_se_silu", 16, 16, 1)
    c = Candidate("l", "mb", m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    measure_candidate(c, x, y)
    n_params = sum(p.numel() for p in m.parameters())
    assert c.state_bytes >= 4 * 4 * n_params  # weights, grads, two AdamW moments
    # At least the expanded activations (64 channels x 8 x 8 floats, several kept) per image.
    assert c.act_bytes > 64 * 64 * 4
    assert c.cost > 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    c2 = Candidate("l", "mb", m)
    measure_candidate(c2, torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16))
    assert 3 < c2.act_bytes / c.act_bytes < 5  # 4x the pixels


def test_layer_tap_captures_and_stops_early():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Conv2d(4, 2, 1))
    calls = []
    net[3].register_forward_hook(lambda *a: calls.append(1))
    tap = LayerTap(net, ["0", "2"])
    x = torch.randn(2, 1, 8, 8)
    acts = tap(x, ["0"])
    # The ReLU writes into layer 0's output in place: the tap must have kept a copy.
    assert torch.equal(acts["0"][1], net[0](x))
    acts = tap(x, ["2"])
    assert torch.equal(acts["2"][0], torch.relu(net[0](x)))
    assert calls == []  # layer 3 never ran: the forward stopped after the last tapped layer


# ----------------------------------------------------------------------------- engine


def _seq_teacher():
    def block(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(block(1, 8, 1), block(8, 16, 2), block(16, 16, 1), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(16, 10))
        return _calibrate(net, 1, 12), block


def _seq_candidates(teacher, block):
    out = []
    for layer, (i, o, s) in {"1": (8, 16, 2), "2": (16, 16, 1)}.items():
        t = teacher.get_submodule(layer)
        out.append(Candidate(layer, "teacher", copy.deepcopy(t), init="teacher", train=False))
        out.append(Candidate(layer, "copy", copy.deepcopy(t), init="teacher"))
        torch.manual_seed(candidate_seed(0, layer, "conv"))
        out.append(Candidate(layer, "conv", block(i, o, s)))
        torch.manual_seed(candidate_seed(0, layer, "proj"))
        out.append(Candidate(layer, "proj", nn.Sequential(nn.Conv2d(i, o, 1, s), nn.BatchNorm2d(o))))
    return out


def _data(n=256, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def test_engine_losses_go_down_and_teacher_layer_is_exact(tmp_path):
    teacher, block = _seq_teacher()
    cands = _seq_candidates(teacher, block)
    opts = Phase1Options(steps=30, batch_size=32, lr=1e-2, progress=False)
    out = train_pool(teacher, cands, _data(), _data(64, seed=1), opts, workdir=tmp_path / "w", log=lambda m: None)
    res = {(e["layer"], e["spec"]): e for e in out["entries"]}
    assert len(res) == 8 and all(e["status"] == "done" for e in res.values())
    for layer in ("1", "2"):
        assert res[(layer, "teacher")]["heldout_loss"] < 1e-10  # the layer itself, untrained
        assert res[(layer, "teacher")]["steps"] == 0
        assert res[(layer, "copy")]["heldout_loss"] < 0.02  # starts at the teacher, stays there
        for spec in ("conv", "proj"):
            e = res[(layer, spec)]
            assert e["steps"] == 30 and e["images"] == 30 * 32
            assert e["train_loss"] < 0.7 * e["train_loss_first"], e
            assert math.isfinite(e["heldout_loss"])
        assert res[(layer, "conv")]["heldout_loss"] < 0.5
    # One teacher pass per training batch and per held-out batch, no more.
    assert out["teacher_passes"] == 30 + 2


def test_engine_groups_give_the_same_result_from_one_teacher_pass(tmp_path):
    teacher, block = _seq_teacher()
    opts = Phase1Options(steps=8, batch_size=32, progress=False)
    one = train_pool(teacher, _seq_candidates(teacher, block), _data(), _data(64, seed=1), opts,
                     workdir=tmp_path / "a", log=lambda m: None)
    opts.max_memory_bytes = 1  # every candidate in a group of its own
    many = train_pool(teacher, _seq_candidates(teacher, block), _data(), _data(64, seed=1), opts,
                      workdir=tmp_path / "b", log=lambda m: None)
    assert one["groups"] == 1 and many["groups"] == 8
    assert many["teacher_passes"] == one["teacher_passes"] == 8 + 2  # later groups replayed the cache
    assert many["cache_mb"] > 0
    assert not (tmp_path / "b" / "cache").exists()  # removed when done
    for a, b in zip(one["entries"], many["entries"]):
        assert (a["layer"], a["spec"]) == (b["layer"], b["spec"])
        for k in ("train_loss", "heldout_loss"):
            assert (a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a, b)


class _Explodes(nn.Module):
    """Turns NaN from its fourth training-mode call on: the memory probe, two good steps, then NaN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        y = self.conv(x)
        return y * float("nan") if self.calls >= 4 else y


def test_engine_nan_candidate_fails_alone(tmp_path):
    teacher, block = _seq_teacher()
    cands = [Candidate("2", "bad", _Explodes()), Candidate("2", "conv", block(16, 16, 1))]
    opts = Phase1Options(steps=6, batch_size=32, progress=False)
    out = train_pool(teacher, cands, _data(), _data(64, seed=1), opts, log=lambda m: None)
    bad, good = out["entries"]
    assert bad["status"] == "failed" and "nan" in bad["reason"].lower()
    assert bad["steps"] == 2  # it trained two good steps, then turned NaN on the third
    assert good["status"] == "done" and good["steps"] == 6 and math.isfinite(good["heldout_loss"])


# ----------------------------------------------------------------------------- the stage


def _init(run: Path, space: Path, images: int = 512, **distill_cfg) -> None:
    from hant.run import init_run

    cfg = run.parent / f"{run.name}.yaml"
    d = {"batch_size": 64, "images": images, "lr": 5e-3, **distill_cfg}
    cfg.write_text(json.dumps({"data": {"heldout": 96}, "distill": d}))
    init_run(run, model="test_distill:small_teacher", data="synthetic:600", input_size=16, space=str(space),
             config=str(cfg), random_teacher=True, log=lambda m: None)


@pytest.fixture()
def space(tmp_path) -> Path:
    p = tmp_path / "space.yaml"
    # mb_k3_e3_se_silu is the teacher's own block for blocks.1.*; ds_k5_se_silu pads blocks.0.0's kernel.
    p.write_text("name: t\ncandidates: [teacher, proj, skip, mb_k3_e3_se_silu, mb_k3_e2_silu, ds_k5_se_silu, "
                 "fmb_k3_e1_relu]\n")
    return p


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted((run / "candidates").rglob("*.safetensors"))}


def test_distill_stage_writes_weights_and_index(tmp_path, space):
    run = tmp_path / "run"
    _init(run, space)
    summary = distill(run, log=lambda m: None)
    index = read_json(run / "candidates" / "index.json")
    layers = read_json(run / "layers.json")["layers"]
    expected = [(d["name"], s) for d in layers for s in d["candidates"]]
    got = [(e["layer"], e["spec"]) for e in index["candidates"]]
    assert got == expected and index["version"] == 1
    assert summary["candidates"] == len(expected) and summary["done"] == len(expected)
    assert summary["teacher_passes"] == 8 + 2  # 512 images / 64, then the 96 held-out images
    assert summary["candidate_images"] == sum(e["images"] for e in index["candidates"]) > 0
    by = {(e["layer"], e["spec"]): e for e in index["candidates"]}
    for e in index["candidates"]:
        for k in ("layer", "spec", "status", "init", "train_loss", "heldout_loss", "steps", "images", "file",
                  "sha256"):
            assert k in e
        assert e["status"] == "done"
        assert sha256_file(run / e["file"]) == e["sha256"]
        assert e["file"] == f"candidates/{e['layer']}/{e['spec']}.safetensors"
        if e["init"] == "teacher":  # the teacher's layer, or an op that computes exactly its function
            assert e["steps"] == 0 and e["heldout_loss"] < 1e-10
        elif e["spec"] != "skip":
            assert e["steps"] == 8 and e["images"] == 512
    # The teacher's own block built as an op, and a zero-padded kernel, start exact and stay so.
    assert by[("blocks.1.1", "mb_k3_e3_se_silu")]["init"] == "teacher"
    assert by[("blocks.1.1", "mb_k3_e3_se_silu")]["heldout_loss"] < 1e-10
    assert by[("blocks.0.0", "ds_k5_se_silu")]["init"] == "teacher"
    assert by[("blocks.0.0", "ds_k5_se_silu")]["heldout_loss"] < 1e-10
    assert by[("blocks.1.1", "mb_k3_e2_silu")]["init"] == "teacher-partial"
    assert by[("blocks.1.1", "fmb_k3_e1_relu")]["init"] == "random"
    trained = [e for e in index["candidates"] if e["steps"] > 0]
    assert {e["init"] for e in trained} == {"random", "teacher-partial"}
    assert all(e["train_loss"] < e["train_loss_first"] for e in trained), trained
    # The saved weights load into a freshly built op.
    mod = ops.build("mb_k3_e2_silu", 16, 16, 1)
    from hant.workspace import load_safetensors

    mod.load_state_dict(load_safetensors(run / by[("blocks.1.1", "mb_k3_e2_silu")]["file"]))
    assert not (run / "candidates" / ".work").exists()

    # A second run finds everything finished: nothing is trained, no teacher pass.
    before = _weights(run)
    again = distill(run, log=lambda m: None)
    assert again["teacher_passes"] == 0 and again["candidate_images"] == 0
    assert {k: list(v) for k, v in _weights(run).items()} == {k: list(v) for k, v in before.items()}


def test_distill_needs_init_and_the_same_teacher(tmp_path, space):
    from safetensors.torch import save_file

    from hant.run import init_run

    with pytest.raises(HantError, match="hant init"):
        distill(tmp_path / "nothing", log=lambda m: None)
    ckpt = tmp_path / "teacher.safetensors"
    teacher = small_teacher()
    save_file(teacher.state_dict(), str(ckpt))
    run = tmp_path / "run"
    init_run(run, model="test_distill:small_teacher", checkpoint=str(ckpt), data="synthetic:600", input_size=16,
             space=str(space), log=lambda m: None)
    sd = teacher.state_dict()
    sd["head.2.bias"] = sd["head.2.bias"] + 1
    save_file(sd, str(ckpt))
    with pytest.raises(HantError, match="changed since"):
        distill(run, log=lambda m: None)


def _env(threads: int = 1, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("HANT_FAULT", None)
    env.update(extra)
    return env


def _hant(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hant.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(TESTS))


def _sigint_default() -> None:
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then never turns it into KeyboardInterrupt; the child must see Ctrl-C as a
    # terminal would deliver it.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fault_run(fault: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from hant.workspace import fault_point\n" + code],
                          env=_env(HANT_FAULT=fault), capture_output=True, text=True, timeout=60,
                          preexec_fn=_sigint_default)


def test_fault_point_acts_at_the_named_passage_with_the_chosen_action(monkeypatch):
    import signal

    # Kill (the caller's default), exit and interrupt; N from `@N` or the older `:N`; the
    # env value's `=action` wins over the caller's; other points and passages do nothing.
    assert _fault_run("a:b@2", "fault_point('a:b', 1); fault_point('a:c', 2)").returncode == 0
    assert _fault_run("a:b@2", "fault_point('a:b', 2)").returncode == -signal.SIGKILL
    assert _fault_run("a:b", "fault_point('a:b', 1, 'exit')").returncode == FAULT_EXIT_CODE
    assert _fault_run("x:y,a:b:3", "fault_point('a:b', 3, 'exit')").returncode == FAULT_EXIT_CODE
    assert _fault_run("a:b@1=exit", "fault_point('a:b', 1)").returncode == FAULT_EXIT_CODE
    interrupted = _fault_run("a:b=interrupt", "fault_point('a:b', 1)\nimport time; time.sleep(5)\nprint('late')")
    assert interrupted.returncode != 0 and "KeyboardInterrupt" in interrupted.stderr and "late" not in interrupted.stdout
    monkeypatch.setenv("HANT_FAULT", "a:b=explode")
    with pytest.raises(ValueError, match="explode"):
        fault_point("a:b")
    fault_point("a:c")  # not this point: nothing happens


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(tmp_path):
    space = tmp_path / "small.yaml"
    space.write_text("name: s\ncandidates: [teacher, proj, mb_k3_e2_silu]\n")
    settings = dict(images=256, checkpoint_minutes=0.0, max_memory_mb=1)  # a group per candidate, 4 steps each
    ref = tmp_path / "ref"
    _init(ref, space, **settings)
    distill(ref, log=lambda m: None)

    run = tmp_path / "run"
    _init(run, space, **settings)
    # Checkpoints come after steps 1, 2 and 3 of each trained group: the 5th is mid-way
    # through the second trained group, after the first group's results were written.
    killed = _hant("distill", "--run", str(run), env=_env(HANT_FAULT="distill:after_checkpoint@5"))
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    assert list((run / "candidates" / ".work").rglob("group-*.json")), "the killed run left no checkpoint"
    partial = read_json(run / "candidates" / "index.json")["candidates"]
    assert 0 < len(partial) < 9 and all(e["status"] == "done" for e in partial)

    # Now no periodic checkpoints: a Ctrl-C (sent before this session's second step, the
    # group's last) must still leave the group saved, in a consistent state.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["distill"]["checkpoint_minutes"] = 60.0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    interrupted = _hant("distill", "--run", str(run), env=_env(HANT_FAULT="distill:interrupt@2"))
    out = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 130, out[-2000:]
    assert "resuming at step 2/4" in out and "saved at step 4/4" in out

    resumed = _hant("distill", "--run", str(run), env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 4/4" in resumed.stdout + resumed.stderr
    final = read_json(run / "candidates" / "index.json")
    # The last session trained only what was left: the rest of the interrupted group's last
    # step was done, so only the groups after it.
    assert 0 < final["phase1"]["candidate_images"] < sum(e["images"] for e in final["candidates"])
    for e in partial:  # finished work was kept, not redone
        assert next(f for f in final["candidates"] if f["layer"] == e["layer"] and f["spec"] == e["spec"]) == e
    a, b = _weights(ref), _weights(run)
    assert set(a) == set(b) and len(a) == len(final["candidates"]) == 9
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert not (run / "candidates" / ".work").exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, space):
    ref = tmp_path / "ref"
    _init(ref, space)
    distill(ref, log=lambda m: None)

    run = tmp_path / "run"
    _init(run, space)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "hant.cli", "--", "distill",
                           "--run", str(run)], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=str(TESTS))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    one = read_json(ref / "candidates" / "index.json")
    two = read_json(run / "candidates" / "index.json")
    assert two["phase1"]["world_size"] == 2
    # Each rank streamed the data once for its share.
    assert two["phase1"]["teacher_passes"] == 2 * one["phase1"]["teacher_passes"]
    assert [(e["layer"], e["spec"]) for e in one["candidates"]] == [(e["layer"], e["spec"]) for e in two["candidates"]]
    for a, b in zip(one["candidates"], two["candidates"]):
        assert a["status"] == b["status"] == "done" and a["init"] == b["init"]
        assert abs(a["heldout_loss"] - b["heldout_loss"]) <= 1e-3 * max(1.0, a["heldout_loss"]), (a, b)
        assert sha256_file(run / b["file"]) == b["sha256"]
    assert not (run / "candidates" / ".parts").exists()


def test_engine_sgd_and_prefetching_workers(tmp_path):
    teacher, block = _seq_teacher()
    opts = Phase1Options(steps=4, batch_size=32, optimizer="sgd", lr=0.05, progress=False)
    plain = train_pool(teacher, _seq_candidates(teacher, block), _data(), _data(64, seed=1), opts,
                       log=lambda m: None)
    opts.workers = 1  # the same batches, loaded ahead by a worker process
    prefetched = train_pool(teacher, _seq_candidates(teacher, block), _data(), _data(64, seed=1), opts,
                            log=lambda m: None)
    for a, b in zip(plain["entries"], prefetched["entries"]):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-6, abs=1e-12)
    conv = next(e for e in plain["entries"] if e["spec"] == "conv" and e["layer"] == "2")
    assert conv["train_loss"] < conv["train_loss_first"]
    with pytest.raises(HantError, match="optimizer"):
        train_pool(teacher, _seq_candidates(teacher, block), _data(), _data(64, seed=1),
                   Phase1Options(steps=1, batch_size=32, optimizer="lamb", progress=False), log=lambda m: None)


def test_images_per_candidate_has_a_floor_under_an_epoch_budget():
    from hant.config import RunConfig
    from hant.distill import images_per_candidate

    cfg = RunConfig()
    # 2% of 1,200 images is 24: one optimiser step. The floor gives every candidate 1024.
    assert images_per_candidate(cfg, None, 1200) == cfg.distill.min_images == 1024
    assert images_per_candidate(cfg, None, 55_000) == 1100  # Fashion-MNIST: its share of an epoch, as before
    cfg.distill.min_images = 0
    assert images_per_candidate(cfg, None, 1200) == 24
    cfg.distill.min_images = 1024
    cfg.distill.images = 100  # a budget in images is taken as it is
    assert images_per_candidate(cfg, None, 1200) == 100 and images_per_candidate(cfg, 7, 1200) == 7
    with pytest.raises(HantError, match="distill.min_images"):
        RunConfig.from_dict({"distill": {"min_images": -1}})
    with pytest.raises(HantError, match="finetune.min_steps"):
        RunConfig.from_dict({"finetune": {"min_steps": 1.5}})
