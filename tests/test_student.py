"""Phase 3: assemble, save/load, fine-tune (and its resume), measure."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hant.config import RunConfig
from hant.dist import Dist
from hant.errors import HantError
from hant.finetune import finetune
from hant.kd import FeatureTaps, _epoch_batches, feature_loss, kd_loss
from hant.schedule import warmup_then_cosine as _lr_at
from hant.layers import get_layer
from hant.measure import measure
from hant.student import assemble, load_student, recalibrate_batchnorm, save_student, update_eval
from hant.teacher import load_teacher
from hant.workspace import FAULT_EXIT_CODE, RunDir, load_safetensors, read_json, write_json
from student_run import layer_names, make_run, write_plan

TESTS = Path(__file__).parent


# On a shared 2-core machine, two intra-op threads per process spin against other
# processes and run 20x slower; results do not depend on it, only the wall time.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("student") / "run")


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    # The teacher checkpoint path in config.yaml points into the module's folder; it is read-only here.
    return dst


def _teacher(run):
    from hant.config import RunConfig

    cfg = RunConfig.load(RunDir(run).config)
    return load_teacher(cfg.model.source, cfg.data.in_chans, cfg.data.num_classes, cfg.model.checkpoint)


def _x(n=4, seed=0):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- replace_layers


def test_replace_layers_works_in_place_and_checks_every_name_first():
    from hant.latency import build_network
    from hant.layers import LayerInfo, replace_layers

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 1)))
    new = nn.Identity()
    assert replace_layers(model, {"1.1": new}) is model and model[1][1] is new
    first = model[0]
    with pytest.raises(HantError, match="no module '2'") as e:
        replace_layers(model, {"0": nn.Identity(), "2": nn.Identity()})
    assert "\n" not in str(e.value) and model[0] is first  # nothing replaced when one name is wrong
    with pytest.raises(HantError, match="nn.Module"):
        replace_layers(model, {"0": "conv"})
    # build_network replaces in a copy: the teacher keeps its own layers.
    layer = LayerInfo.from_dict({"name": "0", "in_shape": [1, 4, 4], "out_shape": [2, 4, 4], "stride": 1,
                                 "in_chs": 1, "out_chs": 2, "params": 4, "flops": 64})
    net = build_network(model, [layer], {"0": "skip"}, lambda info, spec: nn.Identity())
    assert isinstance(net[0], nn.Identity) and model[0] is first


# ----------------------------------------------------------------------------- assemble


def test_assembled_layers_are_the_plan_specs_with_phase1_weights(run):
    names = layer_names(run)
    plan = {names[1]: "proj", names[3]: "mb_k3_e1_relu", names[0]: "teacher"}
    write_plan(run, "p", plan)
    model = assemble(run, "p")
    teacher = _teacher(run)
    assert {k: v["spec"] for k, v in model.hant_arch["layers"].items()} == plan
    for name, spec in plan.items():
        layer = get_layer(model, name)
        if spec == "teacher":
            ref = get_layer(teacher, name)
            assert type(layer) is type(ref)
            for (k, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
                assert torch.equal(p, q), k
            continue
        saved = load_safetensors(RunDir(run).candidate_file(name, spec))
        params = dict(layer.named_parameters())
        assert params and set(params) <= set(saved)
        for k, p in params.items():
            assert torch.equal(p, saved[k]), (name, k)
    # Unplanned layers stay the teacher's.
    assert type(get_layer(model, names[2])) is type(get_layer(teacher, names[2]))
    assert not model.training


def test_bn_recalibration_only_when_a_layer_is_replaced(run):
    names = layer_names(run)
    write_plan(run, "one", {names[1]: "proj"})
    recal = assemble(run, "one")
    plain = assemble(run, "one", bn_recalibrate=False)
    changed = [n for (n, a), (_, b) in zip(recal.named_buffers(), plain.named_buffers())
               if "running_mean" in n and not torch.equal(a, b)]
    assert changed, "re-estimating BatchNorm statistics changed nothing"
    tracked = [b for n, b in recal.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 2 for t in tracked)  # cumulative over finetune.bn_batches=2 batches


def test_all_teacher_plan_reproduces_the_teacher_exactly(run):
    names = layer_names(run)
    write_plan(run, "same", {n: "teacher" for n in names})
    model = assemble(run, "same")  # bn_recalibrate=True, but nothing is replaced
    teacher = _teacher(run)
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))
    for (n, a), (_, b) in zip(model.named_buffers(), teacher.named_buffers()):
        assert torch.equal(a, b), n


def test_assemble_errors_say_what_to_do(run):
    names = layer_names(run)
    with pytest.raises(HantError, match="no plan 'nope'"):
        assemble(run, "nope")
    with pytest.raises(HantError, match="not a replaceable layer"):
        assemble(run, {"head.fc": "proj"})
    with pytest.raises(HantError, match="hant distill"):
        assemble(run, {names[2]: "mb_k3_e3_silu"})  # no phase-1 weights saved for it
    with pytest.raises(ValueError, match="zz"):
        assemble(run, {names[2]: "zz_k3"})
    # A teacher checkpoint other than the one phase 1 learnt from is refused.
    layers_doc = read_json(RunDir(run).layers)
    write_json(RunDir(run).layers, {**layers_doc, "checkpoint_sha256": "0" * 64})
    with pytest.raises(HantError, match="changed since"):
        assemble(run, {names[1]: "proj"})
    write_json(RunDir(run).layers, layers_doc)
    # A candidate file altered after phase 1 is refused by its checksum.
    f = RunDir(run).candidate_file(names[1], "proj")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(HantError, match="checksum"):
        assemble(run, {names[1]: "proj"})


def test_recalibrate_batchnorm_is_a_cumulative_average_without_dropout():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.9))
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 2, 4, 4, generator=g) * (i + 1) + i for i in range(3)]
    used = recalibrate_batchnorm(model, batches, max_batches=3)
    assert used == 3 and not model.training and not model[1].training
    with torch.no_grad():
        means = torch.stack([model[0](b).mean(dim=(0, 2, 3)) for b in batches])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert model[1].momentum == 0.1  # restored
    assert recalibrate_batchnorm(model, batches, max_batches=1) == 1


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_without_run_folder(run, tmp_path):
    names = layer_names(run)
    plan = {names[1]: "proj", names[4]: "mb_k3_e1_relu"}
    model = assemble(run, plan)
    out = save_student(model, tmp_path / "student", model.hant_arch)
    arch = json.loads((out / "arch.json").read_text())
    assert arch["version"] == 1 and arch["teacher"]["source"] == "timm:test_efficientnet"
    assert arch["teacher"]["input_size"] == 32 and len(arch["mean"]) == 1
    assert {k: v["spec"] for k, v in arch["layers"].items()} == plan
    assert set(arch["layers"][names[1]]) >= {"spec", "in_chs", "out_chs", "stride"}
    shutil.rmtree(run)  # neither the run folder nor the teacher checkpoint is needed
    loaded = load_student(out)
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_student(out / "student.safetensors")(x), loaded(x))
    data = bytearray((out / "student.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "student.safetensors").write_bytes(bytes(data))
    with pytest.raises(HantError, match="checksum"):
        load_student(out)


def test_update_eval_merges_sections(tmp_path):
    update_eval(tmp_path, {"teacher": {"top1": 90.0}, "student": {"top1": 89.0}, "target": "x"})
    merged = update_eval(tmp_path, {"teacher": {"latency_ms": 2.0}, "speedup": 2.0})
    assert merged["teacher"] == {"top1": 90.0, "latency_ms": 2.0}
    assert merged["student"] == {"top1": 89.0} and merged["speedup"] == 2.0
    assert read_json(tmp_path / "eval.json")["version"] == 1


# ----------------------------------------------------------------------------- fine-tune pieces


def test_kd_loss_terms():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 0.0, 1.0, 2.0), ce)
    assert kd_loss(t, t, y, 1.0, 0.0, 3.0).abs() < 1e-6  # identical logits: no KL
    kl = kd_loss(s, t, y, 1.0, 0.0, 2.0)
    p = torch.softmax(t / 2, 1)
    ref = 4.0 * (p * (p.log() - torch.log_softmax(s / 2, 1))).sum(1).mean()
    assert torch.allclose(kl, ref, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, 1.0, 0.5, 2.0), ref + 0.5 * ce, atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [_lr_at(s, 100, 5, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] < 0.01


def test_epoch_batches_are_deterministic_and_split_across_ranks():
    data = list(range(50))
    a = _epoch_batches(data, 8, 3, 0, Dist())
    assert a == _epoch_batches(data, 8, 3, 0, Dist()) and a != _epoch_batches(data, 8, 4, 0, Dist())
    assert all(len(b) == 8 for b in a) and len(a) == 6
    r0 = _epoch_batches(data, 4, 3, 0, Dist(rank=0, world=2))
    r1 = _epoch_batches(data, 4, 3, 0, Dist(rank=1, world=2))
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))


# ----------------------------------------------------------------------------- fine-tune end to end


def _plan(run):
    names = layer_names(run)
    write_plan(run, "p", {names[1]: "proj", names[3]: "mb_k3_e1_relu"})
    return "p"


def _weights(run, plan="p"):
    return load_safetensors(RunDir(run).student_dir(plan) / "student.safetensors")


def test_finetune_resumes_to_the_same_weights(run, tmp_path):
    plan = _plan(run)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    logs = []
    res = finetune(other, plan, log=logs.append)
    # 80 train images (120 - 24 test - 16 held out), batch 16: 5 steps per epoch, 2 epochs.
    assert res["steps"] == 10
    assert any("fine-tune p:" in line for line in logs)
    out = RunDir(other).student_dir(plan)
    ev = read_json(out / "eval.json")
    for who in ("teacher", "student"):
        assert 0.0 <= ev[who]["top1"] <= 100.0
    assert ev["student"]["top1_assembled"] is not None and ev["finetune"]["steps"] == 10
    assert ev["params"] > 0 and ev["flops"] > 0
    emb = ev["embedding"]  # the student's features against the teacher's, on the 24 test images
    assert emb["images"] == 24 and -1.0 <= emb["cosine"] <= 1.0
    assert set(emb["retrieval_top1"]) == {"student_to_teacher", "teacher_to_teacher"}
    paired = ev["paired"]  # the drop from the teacher, image by image on the same 24 test images
    assert paired["images"] == 24 and paired["top1"] == ev["student"]["top1"]
    assert paired["reference_top1"] == pytest.approx(ev["teacher"]["top1"])
    assert paired["drop"] == pytest.approx(ev["teacher"]["top1"] - ev["student"]["top1"])
    assert paired["drop_ci95"][0] <= paired["drop"] <= paired["drop_ci95"][1]
    # The fine-tuned student loads on its own and is not the assembled one.
    x = _x()
    with torch.no_grad():
        assert not torch.equal(load_student(out)(x), assemble(other, plan)(x))

    env = {**os.environ, "HANT_FAULT": "finetune:after_epoch:1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    code = f"import torch; torch.set_num_threads(1); from hant.finetune import finetune; finetune({str(run)!r}, {plan!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr[-2000:]
    state = read_json(RunDir(run).student_dir(plan) / "finetune.ckpt.json")
    assert state["step"] == 5 and not state["done"]
    assert not (RunDir(run).student_dir(plan) / "student.safetensors").exists()
    logs = []
    finetune(run, plan, log=logs.append)
    assert any("resuming at step 5/10" in line for line in logs)
    a, b = _weights(run), _weights(other)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetune_floor_in_steps_applies_to_the_config_epochs_only(run):
    from hant.config import RunConfig

    plan = _plan(run)
    cfg = RunConfig.load(RunDir(run).config)
    cfg.finetune.min_steps = 12  # 2 epochs of 80 images at batch 16 are 10 steps
    cfg.save(RunDir(run).config)
    logs = []
    res = finetune(run, plan, log=logs.append)
    assert res["steps"] == 12 and res["epochs"] == pytest.approx(12 / 5)
    assert any("under finetune.min_steps 12" in line for line in logs)
    assert finetune(run, plan, epochs=1.0)["steps"] == 5  # asked for: taken as it is


def test_finetune_restarts_when_settings_change(run):
    plan = _plan(run)
    finetune(run, plan, epochs=0.5)
    out = RunDir(run).student_dir(plan)
    update_eval(out, {"onnx": {"top1": 1.0}, "student": {"latency_ms": 1.0}})
    (out / "model.onnx").write_bytes(b"stale")
    logs = []
    res = finetune(run, plan, epochs=1.0, log=logs.append)
    assert res["steps"] == 5
    assert any("starting over" in line for line in logs)
    ev = read_json(out / "eval.json")  # the earlier student's export and latency are gone
    assert "onnx" not in ev and "latency_ms" not in ev["student"] and ev["finetune"]["steps"] == 5
    assert not (out / "model.onnx").exists()
    # Finished: a rerun trains nothing and keeps the weights.
    before = _weights(run)
    logs = []
    finetune(run, plan, epochs=1.0, log=logs.append)
    assert not any("steps (" in line for line in logs)
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(HantError, match="positive"):
        finetune(run, plan, epochs=0)


def test_outdated_tells_a_finished_student_from_what_the_run_would_train_now(run):
    from hant.finetune import outdated
    from hant.kd import CKPT_FILE, CKPT_STATE

    plan = _plan(run)
    assert outdated(run, plan) is None  # no student yet
    finetune(run, plan, epochs=1.0)
    out = RunDir(run).student_dir(plan)
    assert outdated(run, plan, epochs=1.0) is None
    assert outdated(run, plan, epochs=0.5) == "epochs"
    _set_finetune(run, lr=0.123, ce_weight=0.25)
    assert outdated(run, plan, epochs=1.0) == "ce, lr"
    made = read_json(out / "arch.json")["finetune"]
    _set_finetune(run, lr=made["lr"], ce_weight=made["ce"])
    assert outdated(run, plan, epochs=1.0) is None
    # New starting weights (a re-distillation written since) make it outdated too.
    index = RunDir(run).redistilled_dir(plan) / "index.json"
    write_json(index, {"plan": plan, "complete": False})
    assert outdated(run, plan, epochs=1.0) == "redistilled_index_sha256"
    index.unlink()
    # A student made before students recorded their recipe is compared through its checkpoint.
    arch = read_json(out / "arch.json")
    del arch["finetune"]
    write_json(out / "arch.json", arch)
    assert outdated(run, plan, epochs=1.0) is None and outdated(run, plan, epochs=0.5) == "fine-tuning settings"
    # ... and without either, it counts as current: finished work is never thrown away on a guess.
    (out / CKPT_STATE).unlink()
    (out / CKPT_FILE).unlink()
    assert outdated(run, plan, epochs=0.5) is None


def _set_finetune(run, **settings):
    cfg = RunConfig.load(RunDir(run).config)
    for k, v in settings.items():
        setattr(cfg.finetune, k, v)
    cfg.save(RunDir(run).config)


def test_feature_loss_kinds():
    t = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    s = t + 0.1 * torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    assert feature_loss(t, t, "nmse") == 0 and feature_loss(torch.zeros_like(t), t, "nmse") == pytest.approx(1.0)
    per_sample = (s - t).pow(2).flatten(1).sum(1) / t.pow(2).flatten(1).sum(1)
    assert feature_loss(s, t, "nmse") == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert feature_loss(2 * t, t, "cosine") == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(-t, t, "cosine") == pytest.approx(2.0, abs=1e-6)
    # channels_last gives the same loss as the default layout.
    cl = s.contiguous(memory_format=torch.channels_last)
    for kind in ("nmse", "cosine"):
        assert feature_loss(cl, t, kind) == pytest.approx(feature_loss(s, t, kind).item(), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        feature_loss(s[:, :2], t, "nmse")
    with pytest.raises(ValueError, match="l1"):
        feature_loss(s, t, "l1")
    with pytest.raises(HantError, match="feature_loss"):
        RunConfig.from_dict({"finetune": {"feature_loss": "l2"}})
    with pytest.raises(HantError, match="feature_weight"):
        RunConfig.from_dict({"finetune": {"feature_weight": -1.0}})


@pytest.mark.parametrize("kind", ["nmse", "cosine"])
def test_feature_loss_is_zero_for_the_teacher_and_positive_for_replaced_layers(run, kind):
    names = layer_names(run)
    write_plan(run, "all-teacher", {n: "teacher" for n in names})
    teacher = _teacher(run).eval()
    x = _x(8)
    losses = {}
    for plan in ("all-teacher", _plan(run)):
        student = assemble(run, plan).eval()
        assert list(student.hant_arch["layers"]) == (names if plan == "all-teacher" else [names[1], names[3]])
        with torch.no_grad(), FeatureTaps(student, teacher, list(student.hant_arch["layers"]), kind) as taps:
            teacher(x)
            student(x)
            losses[plan] = taps.loss().item()
            teacher(x)  # cleared after loss(): the next step starts afresh
            student(x)
            assert taps.loss().item() == pytest.approx(losses[plan], rel=1e-6, abs=1e-7)
    assert losses["all-teacher"] == pytest.approx(0.0, abs=1e-6)
    assert losses["p"] > 0.01


@pytest.mark.parametrize("kind", ["nmse", "cosine"])
def test_feature_loss_goes_down_while_finetuning(run, kind):
    plan = _plan(run)
    # The tiny run's candidates are random and its teacher's BatchNorm statistics made up:
    # features start far apart (NMSE ~24, cosine ~1), and 15 steps need a brisk rate.
    _set_finetune(run, lr=1e-2)
    res = finetune(run, plan, epochs=3.0, feature_loss=kind, feature_weight=2.0, log=lambda *_: None)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and all(h["steps"] == 5 for h in hist)
    assert hist[-1]["feature_loss"] < hist[0]["feature_loss"], hist
    assert hist[-1]["loss"] < hist[0]["loss"], hist
    for h in hist:  # the total is the logits' loss plus the weighted feature loss
        assert h["loss"] == pytest.approx(h["logits_loss"] + 2.0 * h["feature_loss"], rel=1e-5)
    ft = read_json(RunDir(run).student_dir(plan) / "eval.json")["finetune"]
    assert ft["feature_loss"] == kind and ft["feature_weight"] == 2.0 and ft["history"] == hist


def test_finetune_with_feature_loss_resumes_to_the_same_weights(run, tmp_path):
    plan = _plan(run)
    _set_finetune(run, feature_loss="nmse", feature_weight=0.5)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    ref = finetune(other, plan, log=lambda *_: None)
    assert len(ref["history"]) == 2 and ref["history"][0]["feature_loss"] > 0

    env = {**os.environ, "HANT_FAULT": "finetune:after_epoch@1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    code = f"import torch; torch.set_num_threads(1); from hant.finetune import finetune; finetune({str(run)!r}, {plan!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr[-2000:]
    logs = []
    res = finetune(run, plan, log=logs.append)
    assert any("resuming at step 5/10" in line for line in logs)
    a, b = _weights(run), _weights(other)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The first epoch's record came from the killed process's checkpoint.
    assert res["history"] == ref["history"]


def test_changing_the_feature_loss_invalidates_the_checkpoint(run):
    from hant.cli import main

    plan = _plan(run)
    finetune(run, plan, epochs=1.0, feature_loss="nmse", log=lambda *_: None)
    logs = []
    finetune(run, plan, epochs=1.0, feature_loss="nmse", log=logs.append)
    assert any("resuming at step 5/5" in line for line in logs) and not any("starting over" in l for l in logs)
    for change in ({"feature_loss": "cosine"}, {"feature_loss": "cosine", "feature_weight": 0.5}, {}):
        logs = []
        finetune(run, plan, epochs=1.0, log=logs.append, **change)
        assert any("starting over" in line for line in logs), change
    # The command line's flags reach the loss, and they too change the settings.
    assert main(["finetune", "--run", str(run), "--plan", plan, "--epochs", "1", "--feature-loss", "cosine",
                 "--feature-weight", "0.25", "--ce-weight", "0", "--no-measure"]) == 0
    ft = read_json(RunDir(run).student_dir(plan) / "eval.json")["finetune"]
    assert (ft["feature_loss"], ft["feature_weight"], ft["ce_weight"]) == ("cosine", 0.25, 0.0)
    assert all(h["feature_loss"] is not None for h in ft["history"])


def test_measure_writes_latency_into_eval(run):
    plan = _plan(run)
    update_eval(RunDir(run).student_dir(plan), {"student": {"top1": 50.0}})
    logs = []
    ev = measure(run, plan, log=logs.append)  # no fine-tuned student yet: times the assembled plan
    assert any("assembled" in line for line in logs)
    for who in ("teacher", "student"):
        s = ev[who]
        assert s["latency_p10_ms"] <= s["latency_ms"] <= s["latency_p90_ms"] and s["latency_ms"] > 0
    assert ev["student"]["top1"] == 50.0  # merged, not overwritten
    assert ev["speedup"] == pytest.approx(ev["teacher"]["latency_ms"] / ev["student"]["latency_ms"])
    assert ev["target"] == "onnxruntime-cpu" and ev["batch_size"] == 1 and ev["predicted_ms"] == 0.5
    assert ev["params"] < ev["teacher"]["params"]


def _fake_timings(monkeypatch, pairs, timing):
    """hant.measure's timer replaced by one that returns (teacher ms, student ms) from `pairs`."""
    from types import SimpleNamespace

    from hant.latency.protocol import Stats

    seq = iter(pairs)

    def timer(run, cfg, plan_d, teacher, student, log):
        t, s = next(seq)
        return {"teacher": Stats.of([t] * 5), "student": Stats.of([s] * 5), "speedup": t / s,
                "speedup_ci_lo": t / s, "speedup_ci_hi": t / s, "timing": dict(timing),
                "target": SimpleNamespace(threads=timing["threads"], fingerprint=lambda: {})}

    monkeypatch.setattr("hant.measure._time_against_teacher", timer)


@pytest.mark.parametrize("pairs, kept, attempts", [
    ([(7.0, 2.0), (6.0, 2.0), (4.4, 2.0)], 4.4, 3),  # drifted twice, then in line with the run: that one
    ([(7.0, 2.0), (6.6, 2.0), (6.0, 2.0)], 6.0, 3),  # drifted every time: the nearest of three
    ([(4.9, 2.0)], 4.9, 1),                          # within the factor: one timing
])
def test_measure_times_again_when_the_teacher_drifts_from_the_run(run, monkeypatch, pairs, kept, attempts):
    plan = _plan(run)
    timing = {"target_id": "onnxruntime-cpu", "batch_size": 1, "threads": 1, "clock": "thread-cpu"}
    # The run's earlier teacher timings: the plan's hardware check (4.0, 4.2 ms) and another
    # student's measurement (4.1 ms); one on another clock does not count.
    d = read_json(RunDir(run).plan(plan))
    d["latency_check"] = {"timing": timing, "rounds": [{"teacher_ms": 4.0}, {"teacher_ms": 4.2}]}
    write_json(RunDir(run).plan(plan), d)
    update_eval(RunDir(run).student_dir("other"), {"teacher": {"latency_ms": 4.1}, "timing": timing})
    update_eval(RunDir(run).student_dir("wall"), {"teacher": {"latency_ms": 40.0},
                                                  "timing": {**timing, "clock": "wall"}})
    _fake_timings(monkeypatch, pairs, timing)
    logs = []
    ev = measure(run, plan, log=logs.append)
    assert len(ev["timing_attempts"]) == attempts
    assert sum("timing again" in line for line in logs) == attempts - 1
    assert ev["teacher"]["latency_ms"] == kept and ev["speedup"] == pytest.approx(kept / 2.0)
    if attempts > 1:
        assert "4.100 ms in this run's 3 earlier timing(s)" in next(x for x in logs if "timing again" in x)


def test_measure_without_earlier_timings_times_once(run, monkeypatch):
    plan = _plan(run)
    timing = {"target_id": "onnxruntime-cpu", "batch_size": 1, "threads": 1, "clock": "thread-cpu"}
    _fake_timings(monkeypatch, [(9.0, 2.0)], timing)
    ev = measure(run, plan, log=lambda *_: None)
    assert [a["teacher_ms"] for a in ev["timing_attempts"]] == [9.0] and ev["speedup"] == pytest.approx(4.5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "nmse"])
def test_finetune_under_torchrun_with_two_processes(run, kind):
    plan = _plan(run)
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # Each rank writes its own file: two ranks printing to one pipe can interleave their lines.
    code = ("import os, sys, json; from hant.finetune import finetune; "
            "r = finetune(sys.argv[1], sys.argv[2], epochs=1.0, log=lambda *_: None, feature_loss=sys.argv[4]); "
            "open(os.path.join(sys.argv[3], 'result-' + os.environ['RANK'] + '.json'), 'w').write(json.dumps(r))")
    script = run.parent / "ddp_finetune.py"
    script.write_text(code)
    out = run.parent / "ddp_results"
    out.mkdir()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(run), plan, str(out),
                           kind], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("result-*.json"))]
    assert len(results) == 2 and results[0] == results[1]  # every rank returns rank 0's result
    ev = read_json(RunDir(run).student_dir(plan) / "eval.json")
    # 80 train images, global batch 16 split over 2 ranks: 5 steps for one epoch.
    assert ev["finetune"]["processes"] == 2 and ev["finetune"]["steps"] == 5 and ev["finetune"]["batch_size"] == 16
    assert ev["finetune"]["feature_loss"] == kind
    assert (ev["finetune"]["history"][0]["feature_loss"] is None) == (kind == "none")
    # Made with two processes, the student is current for a run in one: the recipe, not the split
    # (the feature loss was passed in, not set in the run's config, and is told apart).
    from hant.finetune import outdated

    features = "feature_layers, feature_loss, feature_weight"
    assert outdated(run, plan, epochs=1.0) == (None if kind == "none" else features)
    x = _x()
    with torch.no_grad():
        assert not torch.equal(load_student(RunDir(run).student_dir(plan))(x), assemble(run, plan)(x))


def test_finetune_module_is_the_same_recipe_as_finetune(run, tmp_path):
    # An all-teacher plan replaces nothing (no BatchNorm re-estimation), so fine-tuning it
    # through the plan and fine-tuning the bare teacher module must give the same weights.
    from hant.config import RunConfig
    from hant.data import load_data
    from hant.kd import finetune_module

    names = layer_names(run)
    write_plan(run, "all-teacher", {n: "teacher" for n in names})
    finetune(run, "all-teacher", epochs=1.0, log=lambda *_: None)
    cfg = RunConfig.load(RunDir(run).config)
    train = load_data(cfg.data).train
    teacher = _teacher(run)
    model = _teacher(run)
    res = finetune_module(model, teacher, cfg, train, epochs=1.0, out_dir=tmp_path / "m", key="t",
                          log=lambda *_: None)
    assert res["steps"] == 5 and res["final_loss"] is not None
    a = _weights(run, "all-teacher")
    b = model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The teacher given is not trained.
    t0 = _teacher(run).state_dict()
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    # Finished: a rerun with the same key resumes at the end and leaves the weights alone.
    logs = []
    again = _teacher(run)
    finetune_module(again, teacher, cfg, train, epochs=1.0, out_dir=tmp_path / "m", key="t", log=logs.append)
    assert any("resuming at step 5/5" in line for line in logs)
    assert all(torch.equal(b[k], v) for k, v in again.state_dict().items())


def test_auto_augmentation_is_on_only_when_the_schedule_repeats_the_data(run, tmp_path):
    # "auto" trains as false for up to AUTO_AUGMENT_PASSES passes over the train split and as
    # true beyond: the same weights, step for step.
    import dataclasses

    from hant.config import AUTO_AUGMENT_PASSES, RunConfig
    from hant.data import load_data
    from hant.kd import augments, finetune_module

    assert not augments("auto", 110_000, 55_000) and augments("auto", 200 * 128, 1_200)
    assert augments(True, 1, 100) and not augments(False, 10**6, 10)
    cfg = RunConfig.load(RunDir(run).config)
    train = load_data(cfg.data).train
    teacher = _teacher(run)

    def trained(augment, epochs: float) -> dict:
        c = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, augment=augment))
        model = _teacher(run)
        finetune_module(model, teacher, c, train, epochs=epochs, out_dir=tmp_path / f"{augment}-{epochs:g}",
                        key="t", log=lambda *_: None)
        return model.state_dict()

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    few, many = AUTO_AUGMENT_PASSES / 2, AUTO_AUGMENT_PASSES + 1
    assert same(trained("auto", few), trained(False, few)) and not same(trained(True, few), trained(False, few))
    assert same(trained("auto", many), trained(True, many))


def test_finetune_module_reestimates_batchnorm_before_fitting_the_head(run, tmp_path):
    """A pruned or new network comes with stale or default BatchNorm statistics; with
    recalibrate_bn, fine-tuning starts from statistics of its own train batches, so they do
    not decide where it ends."""
    import dataclasses

    from hant.config import RunConfig
    from hant.data import load_data
    from hant.kd import finetune_module

    cfg = RunConfig.load(RunDir(run).config)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, head_fit=True))
    train = load_data(cfg.data).train
    teacher = _teacher(run)

    def student(stale: bool):
        model = _teacher(run)
        head = model.get_classifier()
        with torch.no_grad():
            head.weight.mul_(4.0)
            if stale:  # statistics far from any the data gives
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.running_mean.add_(3.0)
                        m.running_var.mul_(1e4)
        return model

    runs = {}
    for stale in (False, True):
        model = student(stale)
        res = finetune_module(model, teacher, cfg, train, epochs=0.5, out_dir=tmp_path / str(stale), key="t",
                              log=lambda *_: None, recalibrate_bn=True)
        runs[stale] = (model.state_dict(), res)
    (fresh, r_fresh), (stale, r_stale) = runs[False], runs[True]
    assert r_stale["head_fit"]["applied"] and r_stale["head_fit"] == r_fresh["head_fit"]
    assert all(torch.equal(fresh[k], stale[k]) for k in fresh)


def test_head_fit_refits_the_output_layer_before_the_first_step_and_only_then(run, tmp_path):
    import dataclasses

    from hant.config import RunConfig
    from hant.data import load_data
    from hant.kd import finetune_module

    cfg = RunConfig.load(RunDir(run).config)
    on = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, head_fit=True))
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, head_fit=False))
    train = load_data(cfg.data).train
    teacher = _teacher(run)

    def student():
        model = _teacher(run)
        head = model.get_classifier()
        with torch.no_grad():  # a student whose logits are 4x the teacher's
            head.weight.mul_(4.0)
            head.bias.mul_(4.0)
        return model

    fitted, plain = student(), student()
    res = finetune_module(fitted, teacher, on, train, epochs=1.0, out_dir=tmp_path / "on", key="t",
                          log=lambda *_: None)
    assert res["head_fit"]["applied"] and res["head_fit"]["kl_after"] < res["head_fit"]["kl_before"]
    assert finetune_module(plain, teacher, cfg, train, epochs=1.0, out_dir=tmp_path / "off", key="t",
                           log=lambda *_: None)["head_fit"] is None
    assert res["final_loss"] is not None and not torch.equal(fitted.get_classifier().weight,
                                                             plain.get_classifier().weight)
    # A checkpoint made without the fit is not resumed with it (the first step began elsewhere).
    logs = []
    finetune_module(student(), teacher, on, train, epochs=1.0, out_dir=tmp_path / "off", key="t", log=logs.append)
    assert not any("resuming" in line for line in logs) and any("fitted to the teacher's logits" in line
                                                               for line in logs)
