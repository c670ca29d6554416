"""Reliability: kill and resume, damaged artifacts, the run lock, bad inputs, a full disk, determinism.

docs/reliability.md tabulates what each test here shows. Everything runs on a three-layer
network at 16x16 on synthetic images, so that a whole run (phase 1, latency, scores,
selection, fine-tuning) takes seconds. Kills are real: a stage runs as `python -m hant.cli`
in a subprocess and dies by SIGKILL, either at a fault-injection point (HANT_FAULT) or at a
random moment.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from hant import ops
from hant.cli import main
from hant.errors import HantError
from hant.workspace import RunDir, read_json, sha256_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TEACHER = "test_reliability:tiny_teacher"
DATA = "synthetic:240"  # 48 test, 32 held-out, 160 train images
SPACE = "name: reliability\ncandidates: [teacher, proj, skip, mb_k3_e2_silu, conv_k3_relu]\n"
CONFIG = {
    "data": {"heldout": 32, "batch_size": 32},
    "distill": {"images": 64, "batch_size": 32, "lr": 5e-3, "heldout_images": 32},
    "latency": {"threads": 1, "warmup": 1, "min_repeats": 3, "max_repeats": 5, "time_cap_s": 20.0, "min_time_s": 0.0},
    "finetune": {"epochs": 0.25, "min_steps": 0, "batch_size": 32, "bn_batches": 2},
}
PLAN = "p"


def tiny_teacher(in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """Stem, one depthwise-separable block and two MBConv blocks, a linear head: three layers
    to replace. Seeded without touching the global RNG, so every process builds the same one."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_chans, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
            blocks=nn.Sequential(
                nn.Sequential(ops.build("ds_k3_silu", 8, 8, 1)),
                nn.Sequential(ops.build("mb_k3_e2_silu", 8, 16, 2), ops.build("mb_k3_e2_silu", 16, 16, 1)),
            ),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)),
        ))
        g = torch.Generator().manual_seed(0)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics of a trained network, not the identity
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def unpadded_net(in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """Two unpadded 5x5 convolutions: needs inputs of at least 9x9."""
    return nn.Sequential(nn.Conv2d(in_chans, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread: fast for tiny models on a shared machine, and bit-reproducible between this
    # process and the `OMP_NUM_THREADS=1` subprocesses whose results are compared with it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quiet(*args) -> None:
    pass


def _init(run: Path, space_yaml: str = SPACE, **top) -> Path:
    from hant.run import init_run

    space = run.parent / f"{run.name}-space.yaml"
    space.write_text(space_yaml)
    cfg = run.parent / f"{run.name}-config.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, **top}))
    init_run(run, model=TEACHER, data=DATA, input_size=16, space=str(space), config=str(cfg), random_teacher=True,
             log=_quiet)
    return run


def _complete_run(run: Path) -> Path:
    from hant.distill import distill
    from hant.latency import measure_table
    from hant.score import score
    from hant.select import select

    distill(run, log=_quiet)
    measure_table(run, target="analytic", progress=False, log=_quiet)
    score(run, log=_quiet)
    select(run, target="analytic", speedup=1.2, name=PLAN, log=_quiet)
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished run up to selection (analytic latency table), never modified by the tests."""
    return _complete_run(_init(tmp_path_factory.mktemp("reliability") / "run"))


def _copy(run: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run, dest)
    for name in drop:
        p = dest / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dest


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HANT_FAULT", None)
    env.update(extra)
    return env


def _hant(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hant.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(TESTS))


def _error_line(stderr: str) -> str:
    """The CLI's one error line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "hant: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hant: error: "), stderr[-3000:]
    return errors[0]


def _pool(run: Path) -> list[tuple[str, str]]:
    return [(d["name"], s) for d in read_json(RunDir(run).layers)["layers"] for s in d["candidates"]]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _inode(path: Path) -> int:
    return path.stat().st_ino  # an atomic rewrite replaces the file: a new inode


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


_TIMING_KEYS = {"train_s"}


def _results(entries: list[dict]) -> list[dict]:
    """Index entries without their timings (which differ between any two runs)."""
    return [{k: v for k, v in e.items() if k not in _TIMING_KEYS} for e in entries]


# ---------------------------------------------------------------------------------------------
# Kill anywhere, resume exactly


def test_latency_killed_after_a_layer_resumes_without_remeasuring(base, tmp_path, monkeypatch):
    from hant.latency import measure_table
    from hant.latency.torch_cpu import TorchCPU

    run = _copy(base, tmp_path / "run", drop=("latency",))
    killed = _hant("latency", "--run", str(run), "--target", "torch-cpu",
                   env=_env(HANT_FAULT="latency:after_layer@1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = read_json(run / "latency" / "torch-cpu.json")
    first = partial["layers"][0]
    assert not partial["complete"] and partial["fixed_ms"] is None
    assert [(e["layer"], e["spec"]) for e in partial["entries"]] == [k for k in _pool(run) if k[0] == first]
    assert not list(run.rglob("*.tmp"))
    assert (run / ".lock").exists()  # SIGKILL leaves the lock of a dead process behind

    prepared = []
    real = TorchCPU.prepare

    def counting(self, module, input_shape, example_inputs=None):
        prepared.append(type(module).__name__)
        return real(self, module, input_shape, example_inputs)

    monkeypatch.setattr(TorchCPU, "prepare", counting)
    logs = []
    table = measure_table(run, target="torch-cpu", progress=False, log=logs.append)
    assert any("taking over a stale lock" in m for m in logs)
    # Only what the killed run had not timed: the other layers' candidates and one identity
    # per layer, then the two networks of the fixed part.
    rest = [k for k in _pool(run) if k[0] != first]
    assert len(prepared) == len(rest) + (len(partial["layers"]) - 1) + 2
    assert table["complete"] and [(e["layer"], e["spec"]) for e in table["entries"]] == _pool(run)
    # The first layer's entries are the killed run's measurements, unchanged.
    assert [e for e in table["entries"] if e["layer"] == first] == partial["entries"]
    assert read_json(run / "latency" / "torch-cpu.json")["entries"] == table["entries"]
    assert not (run / ".lock").exists()


def test_score_killed_after_a_layer_resumes_to_the_same_scores(base, tmp_path, monkeypatch):
    import hant.score as score_mod

    run = _copy(base, tmp_path / "run", drop=("scores.json",))
    killed = _hant("score", "--run", str(run), env=_env(HANT_FAULT="score:after_chunk@1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = read_json(run / "scores.json")
    first = _pool(run)[0][0]
    kept = {(e["layer"], e["spec"]): e for e in partial["entries"] if e["spec"] != "teacher"}
    assert kept and {layer for layer, _ in kept} == {first}

    seen = []
    real = score_mod.replacement_scores

    def counting(model, name, candidates, *args, **kwargs):
        seen.extend((name, spec) for spec in candidates)
        return real(model, name, candidates, *args, **kwargs)

    monkeypatch.setattr(score_mod, "replacement_scores", counting)
    logs = []
    out = score_mod.score(run, log=logs.append)
    assert any("taking over a stale lock" in m for m in logs)
    trained = [(e["layer"], e["spec"]) for e in read_json(RunDir(run).candidates_index)["candidates"]
               if e["spec"] != "teacher"]
    assert sorted(seen) == sorted(k for k in trained if k[0] != first)  # nothing scored twice
    assert out["entries"] == read_json(base / "scores.json")["entries"]  # as if never killed
    got = {(e["layer"], e["spec"]): e for e in out["entries"]}
    assert all(got[k] == e for k, e in kept.items())


def test_unreadable_candidate_is_scored_as_failed_and_retried_once_readable(base, tmp_path):
    from hant.score import score

    run = _copy(base, tmp_path / "run", drop=("scores.json",))
    entry = next(e for e in read_json(RunDir(run).candidates_index)["candidates"]
                 if e.get("file") and e["spec"] != "teacher")
    weights = RunDir(run).candidate_file(entry["layer"], entry["spec"])
    _truncate(weights)
    key = (entry["layer"], entry["spec"])
    ref = {(e["layer"], e["spec"]): e for e in read_json(base / "scores.json")["entries"]}

    got = {(e["layer"], e["spec"]): e for e in score(run, log=_quiet)["entries"]}
    assert got[key]["status"] == "failed" and got[key]["unreadable"] and got[key]["d_loss"] is None
    assert got[key]["reason"]  # the loader's one-line error
    assert {k: e for k, e in got.items() if k != key} == {k: e for k, e in ref.items() if k != key}

    # Phase 1 (here: a copy of its file) makes the weights readable again; only they are scored anew.
    shutil.copyfile(RunDir(base).candidate_file(*key), weights)
    logs = []
    again = score(run, log=logs.append)
    assert any(m.endswith("already scored, 1 to go") for m in logs), logs
    assert again["entries"] == read_json(base / "scores.json")["entries"]


def test_teacher_training_killed_at_a_random_moment_resumes_to_the_same_weights(tmp_path):
    from hant.config import DataConfig
    from hant.teacher import read_checkpoint, train_teacher

    epochs, images = 16, 96
    data = DataConfig(spec=DATA, input_size=16, batch_size=32)
    train_teacher(TEACHER, data, epochs=epochs, out=tmp_path / "ref.safetensors", max_train_images=images,
                  log=_quiet)

    out = tmp_path / "teacher.safetensors"
    partial = out.with_suffix(".partial.safetensors")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hant.cli", "train-teacher", "--model", TEACHER,
                                 "--data", DATA, "--input-size", "16", "--batch-size", "32", "--epochs", str(epochs),
                                 "--max-images", str(images), "--out", str(out)],
                                env=_env(), cwd=str(TESTS), stdout=subprocess.DEVNULL, stderr=err)
        try:
            # Progress is saved at every epoch's end (an atomic write: a new inode each time).
            # Time one epoch from the first two saves, then kill at a random moment within
            # the next three epochs, on a machine of any speed.
            deadline = time.monotonic() + 300
            saves = []
            while len(saves) < 2 and proc.poll() is None and time.monotonic() < deadline:
                try:
                    ino = partial.stat().st_ino
                except FileNotFoundError:
                    ino = None
                if ino is not None and (not saves or saves[-1][0] != ino):
                    saves.append((ino, time.monotonic()))
                time.sleep(0.002)
            epoch_s = saves[1][1] - saves[0][1] if len(saves) == 2 else 0.0
            time.sleep(random.uniform(0.0, 3 * epoch_s))
            proc.kill()
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert partial.exists() and not out.exists()

    logs = []
    train_teacher(TEACHER, data, epochs=epochs, out=out, max_train_images=images, log=logs.append)
    resumed = [m for m in logs if m.startswith("resuming")]
    assert resumed and " at step 0/" not in resumed[0]  # the finished epochs were not trained again
    a, b = read_checkpoint(tmp_path / "ref.safetensors"), read_checkpoint(out)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not partial.exists()


# ---------------------------------------------------------------------------------------------
# Damaged artifacts: detected on load, reported in one line, recomputed


def test_damaged_candidate_weights_are_refused_reported_and_trained_again(base, tmp_path, monkeypatch):
    import hant.score as score_mod
    from hant.distill import distill

    run = _copy(base, tmp_path / "run", drop=("scores.json",))
    index = read_json(RunDir(run).candidates_index)["candidates"]
    trained = [e for e in index if e["steps"] > 0]
    altered, cut = trained[0], trained[-1]
    _flip_byte(run / altered["file"])
    _truncate(run / cut["file"])
    damaged = {(altered["layer"], altered["spec"]), (cut["layer"], cut["spec"])}

    # Scoring refuses them by checksum (one line each) and says how to recompute them.
    logs = []
    out = score_mod.score(run, log=logs.append)
    failed = {(e["layer"], e["spec"]): e for e in out["entries"] if e["status"] == "failed"}
    assert set(failed) == damaged
    assert all("checksum" in e["reason"] and "\n" not in e["reason"] for e in failed.values())
    assert any("hant distill" in m for m in logs)

    # Phase 1 finds them by checksum, reports each in one line, and trains those two only.
    inodes = {e["file"]: _inode(run / e["file"]) for e in index}
    logs = []
    summary = distill(run, log=logs.append)
    warned = [m for m in logs if "does not match its recorded checksum" in m]
    assert len(warned) == 2 and all("\n" not in m for m in warned)
    assert summary["candidate_images"] == altered["images"] + cut["images"]
    assert {f: _inode(run / f) for f in inodes if f not in (altered["file"], cut["file"])} == {
        f: i for f, i in inodes.items() if f not in (altered["file"], cut["file"])}
    weights = {k: v for k, v in _files(run / "candidates").items() if k.endswith(".safetensors")}
    assert weights == {k: v for k, v in _files(base / "candidates").items() if k.endswith(".safetensors")}
    assert _results(read_json(RunDir(run).candidates_index)["candidates"]) == _results(index)

    # Scoring then takes the recomputed weights: only those two are scored, as before the damage.
    seen = []
    real = score_mod.replacement_scores

    def counting(model, name, candidates, *args, **kwargs):
        seen.extend((name, spec) for spec in candidates)
        return real(model, name, candidates, *args, **kwargs)

    monkeypatch.setattr(score_mod, "replacement_scores", counting)
    again = score_mod.score(run, log=_quiet)
    assert sorted(seen) == sorted(damaged)
    assert again["entries"] == read_json(base / "scores.json")["entries"]


def test_damaged_phase1_index_is_reported_and_rebuilt(base, tmp_path):
    from hant.distill import distill

    run = _copy(base, tmp_path / "run")
    _truncate(RunDir(run).candidates_index)
    logs = []
    distill(run, log=logs.append)
    assert len([m for m in logs if "index.json is unreadable" in m]) == 1
    # Without the index, no weights file can be checked against its checksum: phase 1 is
    # trained again, to the same result.
    assert _results(read_json(RunDir(run).candidates_index)["candidates"]) == \
        _results(read_json(RunDir(base).candidates_index)["candidates"])
    assert _files(run / "candidates").keys() == _files(base / "candidates").keys()
    assert all(v == _files(base / "candidates")[k] for k, v in _files(run / "candidates").items()
               if k.endswith(".safetensors"))


def test_damaged_latency_table_is_reported_and_measured_afresh(base, tmp_path, capsys):
    from hant.latency import measure_table

    run = _copy(base, tmp_path / "run")
    path = run / "latency" / "analytic.json"
    _truncate(path)
    assert main(["select", "--run", str(run), "--target", "analytic", "--speedup", "1.2"]) == 2
    assert "corrupt" in _error_line(capsys.readouterr().err)
    logs = []
    table = measure_table(run, target="analytic", progress=False, log=logs.append)
    assert len([m for m in logs if "unreadable" in m]) == 1
    ref = read_json(base / "latency" / "analytic.json")
    assert table["entries"] == ref["entries"] and table["fixed_ms"] == ref["fixed_ms"]
    assert read_json(path)["complete"]


def test_damaged_scores_are_reported_and_recomputed(base, tmp_path, capsys):
    from hant.score import score

    run = _copy(base, tmp_path / "run")
    _truncate(run / "scores.json")
    assert main(["select", "--run", str(run), "--target", "analytic", "--speedup", "1.2"]) == 2
    assert "corrupt" in _error_line(capsys.readouterr().err)
    logs = []
    out = score(run, log=logs.append)
    assert len([m for m in logs if "unreadable" in m]) == 1
    assert out["entries"] == read_json(base / "scores.json")["entries"]


def test_damaged_student_weights_are_refused_and_rewritten_without_training(base, tmp_path, monkeypatch):
    import hant.finetune as finetune_mod
    import hant.student as student_mod

    run = _copy(base, tmp_path / "run")
    finetune_mod.finetune(run, PLAN, log=_quiet)
    folder = RunDir(run).student_dir(PLAN)
    weights = folder / "student.safetensors"
    good = weights.read_bytes()
    _flip_byte(weights)
    with pytest.raises(HantError, match="checksum") as e:
        student_mod.load_student(folder)
    assert "\n" not in str(e.value)

    steps = []
    import hant.kd as kd_mod

    real = kd_mod.kd_loss

    def counting(*args, **kwargs):
        steps.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kd_mod, "kd_loss", counting)
    finetune_mod.finetune(run, PLAN, log=_quiet)
    assert steps == []  # rewritten from the finished fine-tuning's checkpoint
    assert weights.read_bytes() == good
    student_mod.load_student(folder)

    # With the checkpoint damaged too, fine-tuning says so in one line and trains again, to
    # the same weights.
    _flip_byte(weights)
    _flip_byte(folder / "finetune.ckpt.safetensors")
    logs = []
    finetune_mod.finetune(run, PLAN, log=logs.append)
    unusable = [m for m in logs if "checkpoint unusable" in m]
    assert len(unusable) == 1 and "checksum" in unusable[0] and "\n" not in unusable[0]
    assert steps and weights.read_bytes() == good


# ---------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_writer_process_is_refused_in_one_line(base, tmp_path):
    run = _copy(base, tmp_path / "run")
    before = _files(run)
    # This test's own process holds the lock: alive, on this host, not the subprocess.
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    second = _hant("distill", "--run", str(run), env=_env())
    assert second.returncode == 2
    assert f"in use by pid {os.getpid()}" in _error_line(second.stderr)
    assert _files(run) == before  # it wrote nothing


@pytest.mark.parametrize("stage", [["distill"], ["latency", "--target", "analytic"], ["score"],
                                   ["finetune", "--plan", PLAN, "--no-measure"]], ids=lambda s: s[0])
def test_live_lock_refuses_a_stage_and_a_dead_holders_lock_is_taken_over(base, tmp_path, capsys, stage):
    run = _copy(base, tmp_path / "run")
    before = _files(run)
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main([stage[0], "--run", str(run), *stage[1:]]) == 2
        assert f"in use by pid {holder.pid}" in _error_line(capsys.readouterr().err)
        assert _files(run) == before
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert main([stage[0], "--run", str(run), *stage[1:]]) == 0
    assert f"taking over a stale lock on {run} (pid {holder.pid} is gone)" in capsys.readouterr().out
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2, nothing written


def _tensor_file(path: Path, labels: int) -> Path:
    from hant.data import save_tensor_data

    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g),  # noqa: E731
                       torch.arange(n) % labels)
    save_tensor_data(path, split(40), test=split(10))
    return path


def _checkpoint(path: Path, change: str) -> Path:
    from safetensors.torch import save_file

    sd = tiny_teacher().state_dict()
    if change == "names":
        sd["head.2.weights"] = sd.pop("head.2.weight")
    elif change == "shapes":
        sd["head.2.weight"] = torch.zeros(5, 16)
    if change == "pickle":
        torch.save(tiny_teacher(), path)
    else:
        save_file(sd, str(path))
    return path


def _empty_imagefolder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    return root


# (id, what to change in `hant init`'s arguments given tmp_path, what the one line must say)
INIT_CASES = [
    ("unknown-model-timm", lambda t: {"--model": "timm:no_such_net"}, "unknown timm model 'no_such_net'"),
    ("unknown-model-module", lambda t: {"--model": "no_such_module:factory"}, "cannot import 'no_such_module'"),
    ("unknown-data-spec", lambda t: {"--data": "mnist"}, "unknown data spec 'mnist'"),
    ("checkpoint-names", lambda t: {"--checkpoint": str(_checkpoint(t / "w.safetensors", "names"))},
     "key 'head.2.weight' is missing"),
    ("checkpoint-shapes", lambda t: {"--checkpoint": str(_checkpoint(t / "w.safetensors", "shapes"))},
     "key 'head.2.weight' has shape (5, 16) in the file but (10, 16) in the model"),
    ("pickled-checkpoint", lambda t: {"--checkpoint": str(_checkpoint(t / "whole.pt", "pickle"))},
     "pass --trust-pickle"),
    ("corrupt-yaml", lambda t: {"--config": str(_write(t / "c.yaml", "data: {heldout: [1, 2\n"))},
     "is not valid YAML (line 2)"),
    ("unknown-config-key", lambda t: {"--config": str(_write(t / "c.yaml", "distill:\n  imagez: 3\n"))},
     "unknown config key 'distill.imagez'"),
    ("input-size-below-minimum", lambda t: {"--input-size": "4"}, "input size 4 is too small"),
    ("input-size-too-small-for-model", lambda t: {"--model": "test_reliability:unpadded_net", "--input-size": "8"},
     "forward failed at input size 1x8x8"),
    ("layer-glob-matches-nothing", lambda t: {"--include": "nothing.*"},
     "--include glob 'nothing.*' matches no module"),
    ("empty-dataset", lambda t: {"--data": f"imagefolder:{_empty_imagefolder(t / 'images')}"}, "holds no images"),
    ("empty-synthetic", lambda t: {"--data": "synthetic:0"}, "needs a positive number of images"),
    ("single-class-dataset", lambda t: {"--data": f"tensors:{_tensor_file(t / 'one.safetensors', 1)}"},
     "has a single class"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("change, message", [c[1:] for c in INIT_CASES], ids=[c[0] for c in INIT_CASES])
def test_bad_input_to_init_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    args = {"--model": TEACHER, "--data": DATA, "--input-size": "16", "--space": "tiny", **change(tmp_path)}
    run = tmp_path / "run"
    flags = [] if "--checkpoint" in args else ["--random-teacher"]
    assert main(["init", "--run", str(run), *[x for kv in args.items() for x in kv], *flags]) == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not (run / "config.yaml").exists() and not (run / "layers.json").exists()


def test_pickled_checkpoint_loads_with_trust_pickle(tmp_path):
    ckpt = _checkpoint(tmp_path / "whole.pt", "pickle")
    assert main(["init", "--run", str(tmp_path / "run"), "--model", TEACHER, "--data", DATA, "--input-size", "16",
                 "--space", "tiny", "--checkpoint", str(ckpt), "--trust-pickle"]) == 0
    assert read_json(tmp_path / "run" / "layers.json")["layers"]


def test_infeasible_budget_names_the_fastest_reachable_latency(base, tmp_path, capsys):
    from hant.latency import entry_costs, load_table

    run = _copy(base, tmp_path / "run")
    fixed, costs = entry_costs(load_table(run, "analytic"))
    layers = {layer for layer, _ in costs}
    fastest = fixed + sum(min(c for (l, _), c in costs.items() if l == layer) for layer in layers)
    assert main(["select", "--run", str(run), "--target", "analytic", "--budget-ms", f"{fastest / 2:.6g}",
                 "--name", "tight"]) == 2
    assert f"{fastest:.4g} ms" in _error_line(capsys.readouterr().err)
    assert not RunDir(run).plan("tight").exists()


def test_latency_table_from_another_machine_is_refused_unless_forced(base, tmp_path, capsys):
    run = _copy(base, tmp_path / "run")
    path = run / "latency" / "analytic.json"
    table = read_json(path)
    table["fingerprint"]["cpu"] = "another machine's CPU"
    path.write_text(json.dumps(table))
    before = path.read_bytes()
    assert main(["latency", "--run", str(run), "--target", "analytic"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "another fingerprint" in line and "another machine's CPU" in line and "--force" in line
    assert path.read_bytes() == before
    assert main(["latency", "--run", str(run), "--target", "analytic", "--force"]) == 0
    assert "reusing a table measured with another fingerprint" in capsys.readouterr().out
    assert read_json(path)["entries"] == table["entries"]


def test_corrupt_run_config_is_one_line(base, tmp_path, capsys):
    run = _copy(base, tmp_path / "run")
    (run / "config.yaml").write_text("model: {source: [unclosed\n")
    before = _files(run)
    assert main(["score", "--run", str(run)]) == 2
    assert "config.yaml is not valid YAML" in _error_line(capsys.readouterr().err)
    assert _files(run) == before


class _NaNOp(nn.Module):
    """A candidate whose output is NaN from the first step."""

    def __init__(self, chs: int):
        super().__init__()
        self.conv = nn.Conv2d(chs, chs, 1)

    def forward(self, x):
        return self.conv(x) * float("nan")


def test_a_candidate_that_gives_nan_is_marked_failed_and_the_rest_continue(tmp_path):
    ops.register_family("nanop", lambda in_chs, out_chs, stride: _NaNOp(in_chs),
                        valid=lambda in_chs, out_chs, stride: in_chs == out_chs and stride == 1)
    try:
        run = _complete_run(_init(tmp_path / "run", "name: nan\ncandidates: [teacher, proj, nanop, conv_k3_relu]\n"))
    finally:
        ops.unregister_family("nanop")
    index = read_json(RunDir(run).candidates_index)["candidates"]
    nan = [e for e in index if e["spec"] == "nanop"]
    assert len(nan) == 2  # the two layers with equal channels and stride 1
    assert all(e["status"] == "failed" and "nan" in e["reason"].lower() and e["file"] is None for e in nan)
    others = [e for e in index if e["spec"] != "nanop"]
    assert others and all(e["status"] == "done" for e in others)
    scored = {(e["layer"], e["spec"]) for e in read_json(RunDir(run).scores)["entries"]}
    assert not any(spec == "nanop" for _, spec in scored)
    assert {(e["layer"], e["spec"]) for e in others} <= scored
    plan = read_json(RunDir(run).plan(PLAN))
    assert "nanop" not in plan["layers"].values() and plan["status"] == "optimal"


# ---------------------------------------------------------------------------------------------
# A full disk: the stage stops in one line, and resumes once space is back


@pytest.fixture()
def full_disk(monkeypatch):
    """`full_disk(n)`: from the (n+1)-th atomic write on, the write's fsync fails with ENOSPC
    (as a full disk reports itself); `full_disk(None)` frees the space again."""
    state = {"left": None}
    real = os.fsync

    def fsync(fd):
        if state["left"] is not None:
            if state["left"] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            state["left"] -= 1
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def set_left(n):
        state["left"] = n

    return set_left


# stage, what the run holds before it, its command, atomic writes that succeed before the disk is full
DISK_CASES = [
    ("distill", ("candidates",), ["distill", "--max-memory", "1"], 9),
    ("latency", ("latency",), ["latency", "--target", "analytic"], 1),
    ("score", ("scores.json",), ["score"], 1),
]


@pytest.mark.parametrize("drop, command, writes", [c[1:] for c in DISK_CASES], ids=[c[0] for c in DISK_CASES])
def test_full_disk_stops_in_one_line_and_resumes_when_space_is_back(base, tmp_path, capsys, full_disk,
                                                                     drop, command, writes):
    run = _copy(base, tmp_path / "run", drop=drop)
    argv = [command[0], "--run", str(run), *command[1:]]
    full_disk(writes)
    assert main(argv) == 2
    assert "no space left on the device" in _error_line(capsys.readouterr().err)
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()
    saved = _stage_results(run, command[0])
    assert saved  # some of the work was finished before the disk filled up
    inodes = {f: _inode(run / f) for f in _stage_files(run, command[0])}

    full_disk(None)
    assert main(argv) == 0
    capsys.readouterr()
    final = _stage_results(run, command[0])
    assert final == _stage_results(base, command[0])  # as if the disk had never been full
    assert all(final[k] == v for k, v in saved.items())  # what was finished was kept ...
    assert {f: _inode(run / f) for f in inodes} == inodes  # ... and not written again
    if command[0] == "distill":
        assert read_json(RunDir(run).candidates_index)["phase1"]["candidate_images"] < \
            read_json(RunDir(base).candidates_index)["phase1"]["candidate_images"]


def _stage_results(run: Path, stage: str) -> dict:
    """The stage's finished results in `run`: {key: result}."""
    rd = RunDir(run)
    if stage == "distill":
        if not rd.candidates_index.exists():
            return {}
        out = {}
        for e in _results(read_json(rd.candidates_index)["candidates"]):
            assert sha256_file(run / e["file"]) == e["sha256"]
            out[(e["layer"], e["spec"])] = {**e, "bytes": (run / e["file"]).read_bytes()}
        return out
    if stage == "latency":
        path = rd.latency_table("analytic")
        if not path.exists():
            return {}
        table = read_json(path)
        out = {(e["layer"], e["spec"]): e for e in table["entries"]}
        if table.get("fixed_ms") is not None:
            out["fixed_ms"] = table["fixed_ms"]
        return out
    if not rd.scores.exists():
        return {}
    return {(e["layer"], e["spec"]): e for e in read_json(rd.scores)["entries"] if e["spec"] != "teacher"}


def _stage_files(run: Path, stage: str) -> list[str]:
    """Finished files that a resumed stage must not write again."""
    if stage != "distill" or not RunDir(run).candidates_index.exists():
        return []
    return [e["file"] for e in read_json(RunDir(run).candidates_index)["candidates"]]


def test_full_disk_while_preparing_a_candidate_does_not_mark_it_failed(base, tmp_path, capsys, monkeypatch):
    from hant.latency.analytic import Analytic

    run = _copy(base, tmp_path / "run", drop=("latency",))
    real = Analytic.prepare
    calls = []

    def prepare(self, module, input_shape, example_inputs=None):
        calls.append(1)
        if len(calls) == 8:  # in the second layer (the first has five candidates and an identity)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, module, input_shape, example_inputs)

    monkeypatch.setattr(Analytic, "prepare", prepare)
    assert main(["latency", "--run", str(run), "--target", "analytic"]) == 2
    assert "no space left on the device while preparing" in _error_line(capsys.readouterr().err)
    partial = read_json(RunDir(run).latency_table("analytic"))
    assert partial["failed"] == [] and {e["layer"] for e in partial["entries"]} == {partial["layers"][0]}
    monkeypatch.setattr(Analytic, "prepare", real)
    assert main(["latency", "--run", str(run), "--target", "analytic"]) == 0
    assert read_json(RunDir(run).latency_table("analytic"))["entries"] == \
        read_json(RunDir(base).latency_table("analytic"))["entries"]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_phase1_scores_and_selection(base, tmp_path):
    again = _complete_run(_init(tmp_path / "again"))
    a, b = RunDir(base), RunDir(again)
    ia, ib = read_json(a.candidates_index)["candidates"], read_json(b.candidates_index)["candidates"]
    assert _results(ia) == _results(ib)  # losses, steps and sha256 of every candidate's weights
    assert ({k: v for k, v in _files(base / "candidates").items() if k.endswith(".safetensors")}
            == {k: v for k, v in _files(again / "candidates").items() if k.endswith(".safetensors")})
    assert read_json(a.scores) == read_json(b.scores)
    pa, pb = read_json(a.plan(PLAN)), read_json(b.plan(PLAN))
    for key in ("layers", "predicted_ms", "predicted_score", "budget_ms", "status"):
        assert pa[key] == pb[key], key

    # Another seed trains other weights: the comparison above can fail.
    other = _init(tmp_path / "seed1", seed=1)
    from hant.distill import distill

    distill(other, log=_quiet)
    io = read_json(RunDir(other).candidates_index)["candidates"]
    assert [e["sha256"] for e in io if e["steps"] > 0] != [e["sha256"] for e in ia if e["steps"] > 0]
