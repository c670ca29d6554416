"""Re-distillation of a plan's chosen candidates on the student's own inputs (hant.redistill)."""

import shutil
from pathlib import Path

import pytest
import torch

from hant.config import RunConfig
from hant.data import load_data
from hant.errors import HantError
from hant.layers import get_layer
from hant.redistill import compare_top1, heldout_nmse, redistill
from hant.run import Run
from hant.student import assemble
from hant.workspace import RunDir, load_safetensors, read_json, sha256_file
from student_run import layer_names, make_run, write_plan

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IMAGES = 1024  # 13 steps of 80 images per layer on the tiny run


def _plan(root: Path) -> dict[str, str]:
    names = layer_names(root)
    return {names[0]: "teacher", names[1]: "proj", names[2]: "mb_k3_e1_relu", names[3]: "proj",
            names[4]: "mb_k3_e1_relu"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("redistill") / "run")
    # The tiny run's candidates are untrained; a larger step makes 13 steps show.
    cfg = RunConfig.load(RunDir(root).config)
    cfg.distill.lr = 2e-2
    cfg.save(RunDir(root).config)
    write_plan(root, "p", _plan(root))
    return root


@pytest.fixture(scope="module")
def done_run(base_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("redistilled") / "run"
    shutil.copytree(base_run, root)
    # One thread, as in the tests (module fixtures start before `one_thread`): the resume
    # test compares weights trained here with weights trained there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = redistill(root, "p", images=IMAGES, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return root, result


@pytest.fixture
def run(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def redistilled(done_run, tmp_path):
    shutil.copytree(done_run[0], tmp_path / "redistilled")
    return tmp_path / "redistilled"


def _replaced(root):
    return [n for n, s in _plan(root).items() if s != "teacher"]


def _params(model, name):
    return {k: v.detach().clone() for k, v in get_layer(model, name).named_parameters()}


def test_heldout_nmse_is_zero_for_the_teacher_and_up_to_the_first_replaced_layer(run):
    names = layer_names(run)
    the_run = Run(run)
    splits = load_data(the_run.config.data)
    teacher = the_run.teacher()
    assert heldout_nmse(the_run.teacher(), teacher, names, splits.heldout) == {n: 0.0 for n in names}
    # Without re-estimated BatchNorm statistics, the layers before the first replaced one are the teacher's.
    student = assemble(run, "p", bn_recalibrate=False)
    nmse = heldout_nmse(student, teacher, names, splits.heldout, batch_size=5)
    assert nmse[names[0]] == 0.0
    assert all(nmse[n] > 0 for n in names[1:])


def test_redistill_lowers_the_student_side_nmse_and_writes_checked_files(done_run):
    root, result = done_run
    replaced = _replaced(root)
    index = read_json(RunDir(root).redistilled_dir("p") / "index.json")
    assert index["complete"] and index["layers"] == {n: s for n, s in _plan(root).items() if s != "teacher"}
    assert [e["layer"] for e in index["entries"]] == replaced and result["trained"] == replaced
    for e in index["entries"]:
        f = root / e["file"]
        assert f.is_file() and sha256_file(f) == e["sha256"]
        assert e["phase1_sha256"] == sha256_file(RunDir(root).candidate_file(e["layer"], e["spec"]))
        # Trained on its student-side inputs: lower than with its phase-1 weights on the same
        # inputs, and lower than in the student assembled from phase-1 weights everywhere.
        assert e["heldout_after"] < e["heldout_start"], e
        assert e["heldout_after"] < e["heldout_before"], e
        assert e["heldout_after"] == index["heldout"]["after"][e["layer"]]
    before, after = index["heldout"]["before"], index["heldout"]["after"]
    assert set(before) == set(after) == set(replaced)
    assert sum(after.values()) < 0.9 * sum(before.values())
    print("held-out NMSE at the replaced layers, phase-1 -> re-distilled:",
          {n: f"{before[n]:.3f} -> {after[n]:.3f}" for n in replaced})


def test_the_index_describes_the_student_that_assemble_builds(redistilled):
    the_run = Run(redistilled)
    splits = load_data(the_run.config.data)
    index = read_json(RunDir(redistilled).redistilled_dir("p") / "index.json")
    student = assemble(redistilled, "p", splits=splits)
    nmse = heldout_nmse(student, the_run.teacher(), _replaced(redistilled), splits.heldout)
    for name, value in nmse.items():
        assert value == pytest.approx(index["heldout"]["after"][name], rel=1e-3)


def test_assemble_uses_redistilled_weights_only_when_present(run, redistilled):
    replaced = _replaced(run)
    phase1 = assemble(run, "p")
    assert phase1.hant_arch["candidate_weights"] == "phase1"
    for name in replaced:
        saved = load_safetensors(RunDir(run).candidate_file(name, _plan(run)[name]))
        assert all(torch.equal(p, saved[k]) for k, p in _params(phase1, name).items())

    root = redistilled
    student = assemble(root, "p")
    assert student.hant_arch["candidate_weights"] == "redistilled"
    index = read_json(RunDir(root).redistilled_dir("p") / "index.json")
    for e in index["entries"]:
        saved = load_safetensors(root / e["file"])
        params = _params(student, e["layer"])
        assert params and all(torch.equal(p, saved[k]) for k, p in params.items())
        assert not all(torch.equal(p, q) for p, q in zip(params.values(), _params(phase1, e["layer"]).values()))
    plain = assemble(root, "p", redistilled=False)
    assert plain.hant_arch["candidate_weights"] == "phase1"
    for name in replaced:
        assert all(torch.equal(p, q) for p, q in zip(_params(plain, name).values(), _params(phase1, name).values()))
    # Another plan on the same run has none.
    write_plan(root, "other", {layer_names(root)[1]: "proj"})
    assert assemble(root, "other").hant_arch["candidate_weights"] == "phase1"


def test_rerun_skips_finished_layers_and_changed_settings_redo_them(redistilled, monkeypatch):
    import hant.redistill as rd_mod

    folder = RunDir(redistilled).redistilled_dir("p")
    stamps = {f: f.stat().st_mtime_ns for f in folder.rglob("*")}

    def no_training(*a, **k):
        raise AssertionError("a finished layer was trained again")

    with monkeypatch.context() as m:
        m.setattr(rd_mod, "_train_layer", no_training)
        result = redistill(redistilled, "p", images=IMAGES, log=lambda msg: None)
    assert result["trained"] == [] and result["reused"] == _replaced(redistilled)
    assert {f: f.stat().st_mtime_ns for f in folder.rglob("*")} == stamps

    trained = []
    real = rd_mod._train_layer

    def counted(student, teacher, name, *a, **k):
        trained.append(name)
        return real(student, teacher, name, *a, **k)

    monkeypatch.setattr(rd_mod, "_train_layer", counted)
    result = redistill(redistilled, "p", images=IMAGES // 2, log=lambda msg: None)
    assert trained == result["trained"] == _replaced(redistilled)
    assert read_json(folder / "index.json")["settings"]["images"] == IMAGES // 2


def test_interrupted_run_resumes_at_the_first_unfinished_layer(run, done_run, monkeypatch):
    import hant.redistill as rd_mod

    real = rd_mod._train_layer
    calls = []

    def interrupted(student, teacher, name, *a, **k):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(student, teacher, name, *a, **k)

    monkeypatch.setattr(rd_mod, "_train_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        redistill(run, "p", images=IMAGES, log=lambda msg: None)
    index = read_json(RunDir(run).redistilled_dir("p") / "index.json")
    replaced = _replaced(run)
    assert not index["complete"] and [e["layer"] for e in index["entries"]] == replaced[:1]
    assert not (run / ".lock").exists()
    assert assemble(run, "p").hant_arch["candidate_weights"] == "phase1"  # unfinished: not used

    monkeypatch.setattr(rd_mod, "_train_layer", real)
    result = redistill(run, "p", images=IMAGES, log=lambda msg: None)
    assert result["reused"] == replaced[:1] and result["trained"] == replaced[1:]
    # The same weights as without the interruption.
    ref = {e["layer"]: load_safetensors(done_run[0] / e["file"]) for e in done_run[1]["entries"]}
    for e in result["entries"]:
        got = load_safetensors(run / e["file"])
        for k, v in ref[e["layer"]].items():
            assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-6), (e["layer"], k)


def test_a_damaged_file_is_refused_by_assemble_and_redone_by_redistill(redistilled):
    index = read_json(RunDir(redistilled).redistilled_dir("p") / "index.json")
    victim = index["entries"][1]
    f = redistilled / victim["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(HantError, match="redistill") as e:
        assemble(redistilled, "p")
    assert "\n" not in str(e.value) and victim["file"] in str(e.value)
    assert assemble(redistilled, "p", redistilled=False).hant_arch["candidate_weights"] == "phase1"

    heard = []
    result = redistill(redistilled, "p", images=IMAGES, log=heard.append)
    assert result["trained"] == [victim["layer"]]
    assert any("checksum" in m for m in heard)
    assert sha256_file(f) == read_json(RunDir(redistilled).redistilled_dir("p") / "index.json")["entries"][1]["sha256"]
    assert assemble(redistilled, "p").hant_arch["candidate_weights"] == "redistilled"


def test_redistill_errors_say_what_to_do(run):
    with pytest.raises(HantError, match="no plan 'nope'"):
        redistill(run, "nope", log=lambda m: None)
    with pytest.raises(HantError, match="--images"):
        redistill(run, "p", images=0, log=lambda m: None)
    with pytest.raises(HantError, match="plan name"):
        redistill(run, {"layers": {}}, log=lambda m: None)
    with pytest.raises(HantError, match="hant redistill"):
        compare_top1(run, "p", log=None)


def test_compare_top1_and_the_command_line(redistilled, capsys):
    from hant.cli import main

    out = compare_top1(redistilled, "p", images=8, log=None)
    assert out["images"] == 8 and all(0.0 <= out[k] <= 100.0 for k in ("teacher", "phase1", "redistilled"))
    assert main(["redistill", "--run", str(redistilled), "--plan", "p", "--images", str(IMAGES)]) == 0
    assert "re-distilled already" in capsys.readouterr().out
    assert main(["redistill", "--run", str(redistilled), "--plan", "nope"]) != 0


def test_a_finetuning_started_from_phase1_weights_is_not_resumed_after_redistill(run):
    from hant.finetune import finetune

    from hant.report import start_lines

    logs = []
    finetune(run, "p", epochs=0.2, log=logs.append)
    assert read_json(RunDir(run).student_dir("p") / "eval.json")["start"] == {"candidate_weights": "phase1"}
    finetune(run, "p", epochs=0.2, log=logs.append)  # the same settings: nothing to redo
    assert not any("starting over" in m for m in logs)
    redistill(run, "p", images=160, log=lambda m: None)
    logs.clear()
    finetune(run, "p", epochs=0.2, log=logs.append)
    assert any("other settings" in m and "starting over" in m for m in logs)
    arch = read_json(RunDir(run).student_dir("p") / "arch.json")
    assert arch.get("candidate_weights") == "redistilled"
    # eval.json and the report say what fine-tuning started from.
    ev = read_json(RunDir(run).student_dir("p") / "eval.json")
    rd = ev["start"]["redistill"]
    assert ev["start"]["candidate_weights"] == "redistilled" and rd["images"] == 160
    assert rd["mean_heldout_nmse_after"] < rd["mean_heldout_nmse_before"]
    row, = start_lines({"evals": {"p": ev}})
    assert row.startswith("| p | re-distilled (160 images per layer; NMSE ") and "0.2 epochs" in row


def _skip_run(root: Path, source: str, plan: dict[str, str]) -> Path:
    make_run(root, specs={name: [spec] for name, spec in plan.items()}, source=source)
    cfg = RunConfig.load(RunDir(root).config)
    cfg.distill.lr = 0.1  # random candidates start far off (NMSE ~38): a large step gets them near in 50
    cfg.save(RunDir(root).config)
    write_plan(root, "p", plan)
    return root


def test_a_layer_followed_by_skips_learns_the_teacher_output_after_them(tmp_path):
    from hant.redistill import _through_skips, is_current

    # MobileNetV3 blocks in a stage follow each other directly: 2.1 and 2.2 read 2.0's output.
    plan = {"blocks.2.0": "proj", "blocks.2.1": "skip", "blocks.2.2": "skip", "blocks.3.0": "proj"}
    own = _skip_run(tmp_path / "own", "timm:mobilenetv3_small_050", plan)
    through = tmp_path / "through"
    shutil.copytree(own, through)
    images = 4 * IMAGES
    a = redistill(own, "p", images=images, log=lambda m: None, through_skips=False)
    b = redistill(through, "p", images=images, log=lambda m: None, through_skips=True)
    targets = {e["layer"]: e.get("target") for e in b["entries"]}
    assert targets == {"blocks.2.0": "blocks.2.2", "blocks.3.0": None}  # 3.1 is the teacher's: no skip to absorb
    assert all("target" not in e for e in a["entries"])
    # Where the skipped layers end, the student is nearer the teacher (measured 0.20 against
    # 0.75); at 2.0 itself, farther (it no longer learns the teacher's output there).
    after_a, after_b = a["heldout"]["after"], b["heldout"]["after"]
    assert after_b["blocks.2.2"] < 0.5 * after_a["blocks.2.2"] and after_b["blocks.2.0"] > after_a["blocks.2.0"]
    # The target is in the layer's key: each index is current only for the setting it was made with.
    assert is_current(own, "p", images=images, through_skips=False)
    assert not is_current(own, "p", images=images, through_skips=True)
    assert is_current(through, "p", images=images, through_skips=True)
    # A layer whose successor reads something else (BatchNorm and ReLU sit between ResNet's
    # stem convolutions) keeps its own target.
    stem = _skip_run(tmp_path / "stem", "timm:test_resnet", {"conv1.0": "proj", "conv1.3": "skip"})
    the_run = Run(stem)
    assert _through_skips(the_run, {"conv1.0": "proj", "conv1.3": "skip"}, ["conv1.0"]) == {}
