"""bench/teacher_convergence.py on a tiny run: the teacher's lift from more fine-tuning, cached."""

import importlib.util
import json
from pathlib import Path

import pytest

from student_run import make_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "bench" / "teacher_convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lift_is_measured_per_epoch_count_and_read_back(bench, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out, cache = tmp_path / "conv.json", tmp_path / "cache"
    args = ["--run", str(run), "--epochs", "0.5,0.25", "--max-gain", "100", "--cache", str(cache), "--out", str(out)]
    assert bench.main(args) == 0
    d = json.loads(out.read_text())
    assert [p["epochs"] for p in d["points"]] == [0.25, 0.5]
    for p in d["points"]:
        assert 0.0 <= p["top1"] <= 100.0 and p["steps"] >= 1
        assert p["gain"] == pytest.approx(p["top1"] - d["teacher_top1"])
    assert d["converged"] is True and d["next"] is None  # a lift of at most 100 points
    assert d["command"].startswith("bench/teacher_convergence.py") and "cpu" in d["fingerprint"]
    assert "fine-tuned for" in capsys.readouterr().out

    # Asked again with a strict limit: read back, not trained; not converged unless no lift at all.
    assert bench.main([*args[:-6], "--max-gain", "-100", "--cache", str(cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned for" not in printed and "not converged" in printed
    d2 = json.loads(out.read_text())
    assert [p["top1"] for p in d2["points"]] == [p["top1"] for p in d["points"]]
    assert d2["converged"] is False and d2["next"].startswith("hant train-teacher") and "--init-from" in d2["next"]


def test_bad_input_gets_one_line(bench, tmp_path, capsys):
    assert bench.main(["--run", str(tmp_path)]) == 2
    assert "hant init" in capsys.readouterr().err
    run = make_run(tmp_path / "run")
    assert bench.main(["--run", str(run), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
