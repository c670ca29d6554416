"""The plan's hardware check and the final measurement: one protocol, medians with intervals."""

import shutil

import pytest

from hant.student import measure, time_plan
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
