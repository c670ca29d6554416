"""`hant init`: config.yaml and layers.json, precedence of arguments, refusal to clobber."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import yaml
from torch import nn

from hant import ops
from hant.cli import main
from hant.config import RunConfig
from hant.errors import HantError
from hant.run import init_run
from hant.workspace import read_json


def mini_net(in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """Stem, two MBConv blocks (one strided), a head; deterministic."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return unseeded_net(in_chans, num_classes)


def unseeded_net(in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """The same network named without weights: every call draws new ones from the global RNG."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_chans, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()),
        blocks=nn.Sequential(nn.Sequential(ops.build("mb_k3_e2_silu", 8, 16, 2),
                                           ops.build("mb_k3_e2_silu", 16, 16, 1))),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)),
    )).eval()


MODEL = "test_run:mini_net"
QUIET = dict(log=lambda m: None)


def _init(run, **kw):
    args = dict(model=MODEL, data="synthetic:200", input_size=16, space="tiny")
    args.update(kw)
    if args.get("checkpoint") is None:
        args.setdefault("random_teacher", True)
    return init_run(run, **args, **QUIET)


def test_init_writes_config_and_layers(tmp_path):
    run = tmp_path / "run"
    cfg = _init(run)
    assert isinstance(cfg, RunConfig)
    saved = RunConfig.load(run / "config.yaml")
    assert saved.to_dict() == cfg.to_dict()
    # Filled in from the data, so later stages can rebuild the teacher without it.
    assert (saved.data.in_chans, saved.data.num_classes) == (1, 10)
    assert len(saved.data.mean) == 1 and len(saved.data.std) == 1
    doc = read_json(run / "layers.json")
    assert doc["version"] == 1 and doc["model"] == MODEL and doc["space"] == "tiny"
    assert doc["input_size"] == [1, 16, 16]
    names = [d["name"] for d in doc["layers"]]
    assert names == ["blocks.0.0", "blocks.0.1"]
    first, second = doc["layers"]
    assert first["in_shape"] == [8, 16, 16] and first["out_shape"] == [16, 8, 8] and first["stride"] == 2
    assert first["params"] == sum(p.numel() for p in mini_net().blocks[0][0].parameters())
    assert first["flops"] > 0
    # Every pool has the teacher and proj; skip only where the shape is kept.
    assert "teacher" in first["candidates"] and "proj" in first["candidates"]
    assert "skip" not in first["candidates"] and "skip" in second["candidates"]
    assert isinstance(doc["skipped"], list)
    assert not (run / ".lock").exists()


def test_init_again_with_the_same_config_is_a_no_op(tmp_path):
    run = tmp_path / "run"
    _init(run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    cfg = _init(run)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert cfg.space == "tiny"


def test_init_refuses_another_config(tmp_path):
    run = tmp_path / "run"
    _init(run)
    with pytest.raises(HantError) as e:
        _init(run, input_size=32)
    msg = str(e.value)
    assert "data.input_size" in msg and "16" in msg and "32" in msg and "\n" not in msg
    assert RunConfig.load(run / "config.yaml").data.input_size == 16


def test_init_arguments_override_the_config_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"space": "default", "data": {"spec": "synthetic:200", "input_size": 16},
                                    "distill": {"images": 777}, "layers": {"exclude": ["blocks.0.1"]}}))
    run = tmp_path / "run"
    cfg = init_run(run, model=MODEL, space="tiny", config=str(base), random_teacher=True, **QUIET)
    assert cfg.space == "tiny"  # the argument wins
    assert cfg.distill.images == 777 and cfg.data.spec == "synthetic:200"  # the file fills the rest
    assert [d["name"] for d in read_json(run / "layers.json")["layers"]] == ["blocks.0.0"]
    # Empty include/exclude from the command line keep the file's.
    run2 = tmp_path / "run2"
    cfg2 = init_run(run2, model=MODEL, include=[], exclude=[], config=str(base), random_teacher=True, **QUIET)
    assert cfg2.layers.exclude == ["blocks.0.1"]


def test_init_records_paths_absolute_and_checks_the_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file(mini_net().state_dict(), "teacher.safetensors")
    cfg = _init(tmp_path / "run", checkpoint="teacher.safetensors")
    assert cfg.model.checkpoint == str(tmp_path / "teacher.safetensors")
    assert len(read_json(tmp_path / "run" / "layers.json")["checkpoint_sha256"]) == 64
    with pytest.raises(HantError, match="not found"):
        _init(tmp_path / "run2", checkpoint="missing.safetensors")
    # Weights of another network fail at init, not later.
    save_file({"x": torch.zeros(1)}, "wrong.safetensors")
    with pytest.raises(HantError):
        _init(tmp_path / "run3", checkpoint="wrong.safetensors")
    assert not (tmp_path / "run3" / "layers.json").exists()


def test_init_refuses_a_teacher_that_trained_on_the_held_out_images(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file(mini_net().state_dict(), "teacher.safetensors")

    def trained_with(seed, heldout, data="synthetic:200"):  # what `hant train-teacher` writes beside F
        (tmp_path / "teacher.json").write_text(json.dumps({"data": data, "data_seed": seed, "heldout": heldout}))

    # synthetic:200 holds out 32 images (a fifth of its 160-image train pool).
    for i, (seed, heldout) in enumerate([(1, 32), (0, 31)]):
        trained_with(seed, heldout)
        with pytest.raises(HantError, match=f"holding out {heldout} images with data seed {seed}") as e:
            _init(tmp_path / f"bad{i}", checkpoint="teacher.safetensors")
        assert "\n" not in str(e.value) and not (tmp_path / f"bad{i}" / "layers.json").exists()
    # The same permutation's first 32 are among the teacher's first 50; other data is not compared.
    for i, (seed, heldout, data) in enumerate([(0, 50, "synthetic:200"), (1, 32, "synthetic:300")]):
        trained_with(seed, heldout, data)
        _init(tmp_path / f"ok{i}", checkpoint="teacher.safetensors")
    # `hant train-teacher` splits as a run does by default, whatever its --seed.
    from hant.cli import build_parser

    args = build_parser().parse_args(["train-teacher", "--out", "t.safetensors", "--seed", "3"])
    assert (args.data_seed, args.heldout, args.seed) == (0, 5000, 3)


def test_init_bad_inputs_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(HantError, match="unknown space"):
        _init(tmp_path / "a", space="nope")
    with pytest.raises(HantError):
        _init(tmp_path / "b", include=["nothing.*"])
    code = main(["init", "--run", str(tmp_path / "c"), "--model", MODEL, "--data", "synthetic:200",
                 "--input-size", "16", "--space", "nope", "--random-teacher"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hant: error:") and "\n" not in err


def test_cli_init(tmp_path, capsys):
    code = main(["init", "--run", str(tmp_path / "run"), "--model", MODEL, "--data", "synthetic:200",
                 "--input-size", "16", "--space", "tiny", "--exclude", "blocks.0.0", "--random-teacher"])
    assert code == 0
    doc = json.loads((tmp_path / "run" / "layers.json").read_text())
    assert [d["name"] for d in doc["layers"]] == ["blocks.0.1"]


def test_a_teacher_without_weights_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(HantError, match="without weights: pass --checkpoint FILE .* or --random-teacher"):
        init_run(tmp_path / "a", model="test_run:unseeded_net", data="synthetic:200", input_size=16, space="tiny",
                 **QUIET)
    assert not (tmp_path / "a" / "config.yaml").exists()
    code = main(["init", "--run", str(tmp_path / "b"), "--model", "test_run:unseeded_net", "--data", "synthetic:200",
                 "--input-size", "16", "--space", "tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--random-teacher" in err and "\n" not in err
    with pytest.raises(HantError, match="drop --checkpoint"):
        _init(tmp_path / "c", checkpoint=str(tmp_path / "x.safetensors"), random_teacher=True)


def test_random_teacher_is_seeded_saved_and_checked_like_a_checkpoint(tmp_path):
    from hant.teacher import load_teacher
    from hant.workspace import sha256_file

    run = tmp_path / "run"
    kw = dict(model="test_run:unseeded_net", random_teacher=True)
    cfg = _init(run, **kw)
    saved = run / "teacher.safetensors"
    assert cfg.model.random_init and cfg.model.checkpoint == str(saved.resolve())
    sha = sha256_file(saved)
    assert read_json(run / "layers.json")["checkpoint_sha256"] == sha
    # The same command again reuses the weights; nothing is redrawn.
    _init(run, **kw)
    assert sha256_file(saved) == sha
    # Every later load is that network, whatever the global RNG does meanwhile.
    torch.manual_seed(123)
    a = load_teacher(cfg.model.source, 1, 10, cfg.model.checkpoint)
    b = load_teacher(cfg.model.source, 1, 10, cfg.model.checkpoint)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # Another run with the same seed gets the same weights (the seed, not the RNG's state, decides).
    _init(tmp_path / "twin", **kw)
    assert sha256_file(tmp_path / "twin" / "teacher.safetensors") == sha


def test_two_processes_with_random_teacher_give_identical_phase1(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"heldout": 32, "batch_size": 32},
                                      "distill": {"images": 64, "batch_size": 32, "heldout_images": 32}}))

    def hant(*args):
        proc = subprocess.run([sys.executable, "-m", "hant.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    index = {}
    for name in ("a", "b"):
        run = tmp_path / name
        hant("init", "--run", str(run), "--model", "test_run:unseeded_net", "--data", "synthetic:160",
             "--input-size", "16", "--space", "tiny", "--config", str(config), "--random-teacher")
        hant("distill", "--run", str(run))
        index[name] = {(e["layer"], e["spec"]): e for e in read_json(run / "candidates" / "index.json")["candidates"]}
    assert index["a"].keys() == index["b"].keys() and len(index["a"]) > 3
    for key, e in index["a"].items():
        assert e["heldout_loss"] == index["b"][key]["heldout_loss"] and e["sha256"] == index["b"][key]["sha256"], key


def test_run_is_the_one_reader_of_a_run_folder(tmp_path):
    import sys
    from pathlib import Path

    from hant.run import Run

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from student_run import layer_names, make_run, write_plan
    finally:
        sys.path.pop(0)

    with pytest.raises(HantError, match="run `hant init"):
        Run(tmp_path / "nothing").config
    root = make_run(tmp_path / "run")
    run = Run(root)
    names = layer_names(root)
    assert [info.name for info in run.layers] == names and len(run.input_shape) == 3
    assert set(run.pools) == set(names)
    teacher = run.teacher()
    assert not teacher.training and run.teacher() is not teacher  # a fresh copy each time
    # Phase-1 weights come back checked against their sha256; a missing one names the stage.
    state = run.candidate(names[1], "proj")
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(HantError, match="no phase-1 weights; run `hant distill"):
        run.candidate(names[1], "conv_k5_relu")
    entry = run.candidate_index()[(names[1], "proj")]
    (root / entry["file"]).write_bytes(b"damaged")
    with pytest.raises(HantError):
        run.candidate(names[1], "proj")
    write_plan(root, "p", {names[0]: "proj"})
    assert run.plan("p")["layers"] == {names[0]: "proj"} and run.plan("p")["name"] == "p"
    with pytest.raises(HantError, match="no plan 'q' .* plans: p"):
        run.plan("q")
    # The teacher checkpoint is checked once per Run, against the sha256 that init recorded.
    ckpt = Path(run.config.model.checkpoint)
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    first = next(iter(sd))
    sd[first] = sd[first] + 1
    save_file(sd, ckpt)
    with pytest.raises(HantError, match="changed since `hant init`"):
        Run(root).teacher()
    ckpt.unlink()
    with pytest.raises(HantError, match="is missing"):
        Run(root).check_teacher()
