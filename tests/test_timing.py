"""The plan's hardware check and the final measurement: one protocol, medians with intervals."""

import shutil

import pytest

from hant.measure import measure, time_plan
from hant.workspace import RunDir
from student_run import layer_names, make_run, write_plan

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("timing") / "run")


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def test_check_and_final_measurement_share_the_protocol_and_record_intervals(run):
    names = layer_names(run)
    write_plan(run, "p", {names[1]: "proj", names[3]: "mb_k3_e1_relu"})
    check = time_plan(run, "p", log=lambda s: None)
    ev = measure(run, "p", log=lambda s: None)
    # The same target, threads, clock and protocol, recorded in both outputs.
    assert check["timing"] == ev["timing"]
    assert ev["timing"]["threads"] == 1 and ev["timing"]["clock"] == "thread-cpu"  # the config's default
    assert ev["timing"]["protocol"]["turn_warmup"] == 1 and 0 < ev["timing"]["protocol"]["confidence"] < 1
    for who in ("teacher", "student"):
        s = ev[who]
        assert s["latency_ci_lo_ms"] <= s["latency_ms"] <= s["latency_ci_hi_ms"]
        assert isinstance(s["latency_converged"], bool)
        assert check[f"{who}_ci_lo_ms"] <= check[f"{who}_ms"] <= check[f"{who}_ci_hi_ms"]
    assert ev["speedup_ci_lo"] <= ev["speedup"] <= ev["speedup_ci_hi"]
    assert check["speedup_ci_lo"] <= check["speedup"] <= check["speedup_ci_hi"]
    assert ev["speedup"] == pytest.approx(ev["teacher"]["latency_ms"] / ev["student"]["latency_ms"])
    assert (RunDir(run).student_dir("p") / "eval.json").exists()


# ----------------------------------------------------------------------------- the comparer


class _Fixed:
    """A runnable whose every call takes `ms` (as the fake target below reports it)."""

    def __init__(self, ms):
        self.ms, self.calls = ms, 0

    def run(self):
        self.calls += 1


def _fixed_target():
    from hant.latency import Target

    class Fixed(Target):
        id = "fixed"

        def prepare(self, module, input_shape, example_inputs=None):
            return _Fixed(module.ms)

        def time(self, runnable, n):
            for _ in range(n):
                runnable.run()
            return [runnable.ms] * n

    return Fixed(threads=1)


def test_time_against_teacher_gives_speedups_with_intervals_and_warms_every_turn():
    from torch import nn

    from hant.errors import HantError
    from hant.latency.compare import time_against_teacher
    from hant.latency.protocol import Protocol

    teacher, student = nn.Identity(), nn.Identity()
    teacher.ms, student.ms = 4.0, 2.0
    onnx = _Fixed(1.0)  # a prepared runnable is timed as it is
    zero = _Fixed(0.0)
    proto = Protocol(warmup=2, min_repeats=5, max_repeats=5)
    cmp = time_against_teacher(teacher, {"student": student, "onnx": onnx, "zero": zero}, _fixed_target(),
                               (1, 4, 4), proto)
    assert cmp.teacher.median_ms == 4.0 and cmp.stats["student"].median_ms == 2.0
    assert cmp.speedups["student"] == (2.0, 2.0, 2.0) and cmp.speedups["onnx"].ratio == 4.0
    assert cmp.speedups["zero"] is None  # below the clock's resolution: no ratio
    assert cmp.protocol.turn_warmup == 1
    # Every timed call was preceded by an untimed one in its turn, after the warm-up.
    assert onnx.calls == proto.warmup + 2 * cmp.stats["onnx"].n
    with pytest.raises(HantError, match="teacher"):
        time_against_teacher(teacher, {"teacher": student}, _fixed_target(), (1, 4, 4), proto)
    with pytest.raises(HantError, match="cannot time"):
        time_against_teacher(teacher, {"student": object()}, _fixed_target(), (1, 4, 4), proto)


def test_other_load_counts_other_processes_cpu_time_not_this_ones(monkeypatch):
    import os

    from hant.latency.base import OtherLoad

    reads = iter([(0.0, 10.0, 1.0), (2.0, 13.0, 2.0)])  # (wall s, all processes' busy s, this process's s)
    monkeypatch.setattr(OtherLoad, "_read", staticmethod(lambda: next(reads)))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 3 s busy in all, 1 s of it this process's: 2 s of others' over 2 s on 2 cores.
    assert OtherLoad().start().share() == pytest.approx(0.5)
    # Off Linux (no /proc/stat) there is nothing to say.
    monkeypatch.setattr(OtherLoad, "_read", staticmethod(lambda: None))
    assert OtherLoad().start().share() is None
    # A real reading is a share of the machine.
    monkeypatch.undo()
    share = OtherLoad().start().share()
    assert share is None or share >= 0.0


def test_a_timing_on_a_busy_machine_is_flagged_and_recorded(run, monkeypatch):
    from hant.latency.base import OtherLoad

    names = layer_names(run)
    write_plan(run, "p", {names[1]: "proj"})
    monkeypatch.setattr(OtherLoad, "share", lambda self: 0.6)
    lines = []
    ev = measure(run, "p", log=lines.append)
    assert ev["other_load"] == 0.6
    warn = [ln for ln in lines if ln.startswith("warning: measure p:")]
    assert len(warn) == 1 and "60%" in warn[0] and f"hant measure --run {run} --plan p" in warn[0]
    monkeypatch.setattr(OtherLoad, "share", lambda self: 0.1)
    lines.clear()
    check = time_plan(run, "p", log=lines.append)
    assert check["other_load"] == 0.1 and not any(ln.startswith("warning:") for ln in lines)


def test_cli_measure_times_a_plan_into_eval_json(run):
    from hant.cli import main

    names = layer_names(run)
    write_plan(run, "p", {names[1]: "proj"})
    assert main(["measure", "--run", str(run), "--plan", "p"]) == 0
    assert (RunDir(run).student_dir("p") / "eval.json").exists()
    assert main(["measure", "--run", str(run), "--plan", "nope"]) == 2
