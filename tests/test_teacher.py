import dataclasses
import json
import shlex
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from hant.config import DataConfig
from hant.errors import HantError
from hant.schedule import one_cycle_lr
from hant.teacher import create_model, load_teacher, parse_source, read_checkpoint
from hant.teacher_train import TeacherRecipe, evaluate, teacher_meta_path, train_teacher
from hant.workspace import save_safetensors, sha256_file

TINY = "timm:test_efficientnet"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a busy shared machine the
    # thread barriers of every small op make them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _out_shape(model, in_chans, size=32):
    with torch.no_grad():
        return tuple(model.eval()(torch.randn(2, in_chans, size, size)).shape)


@pytest.mark.parametrize("source", ["timm:test_resnet", "timm:efficientnet_b0", "torchvision:resnet18"])
def test_create_model_gray_input(source):
    m = create_model(source, in_chans=1, num_classes=7)
    assert _out_shape(m, 1) == (2, 7)


def test_torchvision_three_channels_untouched():
    m = create_model("torchvision:mobilenet_v3_small", in_chans=3, num_classes=5)
    assert m.features[0][0].in_channels == 3 and _out_shape(m, 3) == (2, 5)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "hant_test_factories.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small(in_chans, num_classes):
            return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))

        def fixed():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def anything(**kw):
            return small(kw["in_chans"], kw["num_classes"])

        def not_a_model(in_chans, num_classes):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hant_test_factories"
    sys.modules.pop("hant_test_factories", None)


def test_factory_sources(factory_module):
    assert _out_shape(create_model(f"{factory_module}:small", 2, 6), 2) == (2, 6)
    assert _out_shape(create_model(f"{factory_module}:anything", 1, 3), 1) == (2, 3)
    assert _out_shape(create_model(f"{factory_module}:fixed", 1, 3), 3) == (2, 2)  # takes neither argument
    with pytest.raises(HantError, match="not a torch nn.Module"):
        create_model(f"{factory_module}:not_a_model", 1, 3)
    with pytest.raises(HantError, match="no callable 'nope'"):
        create_model(f"{factory_module}:nope", 1, 3)


@pytest.mark.parametrize("source,match", [
    ("timm:efficientnet_b99", "close matches: .*efficientnet"),
    ("torchvision:resnet19", "unknown torchvision model 'resnet19'"),
    ("efficientnet_b0", "did you mean timm:efficientnet_b0"),
    ("no_such_package.models:build", "cannot import 'no_such_package.models'"),
])
def test_unknown_model_is_one_line(source, match):
    with pytest.raises(HantError, match=match) as e:
        create_model(source, 1, 10)
    assert "\n" not in str(e.value)


def test_parse_source():
    assert parse_source("timm:resnet18") == ("timm", "resnet18")
    assert parse_source("pkg.mod:make") == ("factory", "pkg.mod:make")


def _tiny(num_classes=4):
    torch.manual_seed(0)
    return create_model("timm:test_resnet", 1, num_classes).eval()


def test_safetensors_roundtrip(tmp_path):
    m = _tiny()
    save_safetensors(tmp_path / "w.safetensors", m.state_dict())
    back = load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "w.safetensors")
    assert not back.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), m(x))


@pytest.mark.parametrize("wrap", ["state_dict", "model", None])
def test_torch_checkpoint_wrappers(tmp_path, wrap):
    m = _tiny()
    sd = {f"module.{k}": v for k, v in m.state_dict().items()} if wrap == "model" else m.state_dict()
    torch.save({wrap: sd, "epoch": 3} if wrap else sd, tmp_path / "w.pt")
    back = load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "w.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_pickled_module_needs_trust(tmp_path):
    m = _tiny()
    torch.save(m, tmp_path / "whole.pt")
    with pytest.raises(HantError, match="--trust-pickle") as e:
        load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "whole.pt")
    assert "\n" not in str(e.value)
    back = load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "whole.pt", trust_pickle=True)
    key = next(iter(m.state_dict()))
    assert torch.equal(back.state_dict()[key], m.state_dict()[key])


def test_mismatched_checkpoint_names_key(tmp_path):
    save_safetensors(tmp_path / "w5.safetensors", _tiny(num_classes=5).state_dict())
    with pytest.raises(HantError, match=r"key 'fc.weight' has shape \(5, .*\) in the file"):
        load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "w5.safetensors")
    sd = _tiny().state_dict()
    missing = dict(sd)
    missing.pop("fc.bias")
    save_safetensors(tmp_path / "missing.safetensors", missing)
    with pytest.raises(HantError, match="key 'fc.bias' is missing"):
        load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "missing.safetensors")
    save_safetensors(tmp_path / "extra.safetensors", {**sd, "head.extra": torch.zeros(1)})
    with pytest.raises(HantError, match="unexpected key 'head.extra'"):
        load_teacher("timm:test_resnet", 1, 4, checkpoint=tmp_path / "extra.safetensors")


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(HantError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(HantError, match="not a"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(HantError, match="no state dict"):
        read_checkpoint(tmp_path / "empty.pt")


def test_one_cycle_lr_shape():
    lrs = [one_cycle_lr(s, 100, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(1 / 25)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 15
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:]))


def _cfg():
    return DataConfig(spec="synthetic:300", input_size=16, heldout=20, batch_size=16)


def test_train_teacher_learns_and_writes_files(tmp_path):
    out = tmp_path / "teacher.safetensors"
    r = train_teacher(TINY, _cfg(), epochs=4, out=out, lr=5e-3, seed=0, max_train_images=200, command="hant test")
    assert out.exists() and teacher_meta_path(out).exists()
    assert not out.with_suffix(".partial.safetensors").exists()
    meta = json.loads(teacher_meta_path(out).read_text())
    for key in ("source", "in_chans", "num_classes", "input_size", "data", "mean", "std", "test_top1", "epochs",
                "train_time_s", "images_per_s", "command", "version"):
        assert key in meta, key
    assert (meta["source"], meta["in_chans"], meta["num_classes"], meta["input_size"]) == (TINY, 1, 10, 16)
    assert meta["train_images"] == 200 and meta["command"] == "hant test" and meta["epochs"] == 4
    # Ten classes: chance is 10%.
    assert r["test_top1"] > 40, r
    assert len(r["history"]) == 4 and r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    # The saved weights are the evaluated ones.
    from hant.data import load_data, make_loader

    splits = load_data(_cfg())
    teacher = load_teacher(TINY, 1, 10, checkpoint=out)
    assert evaluate(teacher, make_loader(splits.test, 64))["top1"] == pytest.approx(r["test_top1"], abs=1e-3)


def test_train_teacher_init_from_continues_from_weights(tmp_path):
    first = tmp_path / "first.safetensors"
    r1 = train_teacher(TINY, _cfg(), epochs=2, out=first, lr=5e-3, seed=0, max_train_images=200, command="t")
    # A second cycle at a learning rate too small to move any weight starts where the first
    # ended. Its accuracy is not compared: BatchNorm running statistics still move in train
    # mode, by amounts that depend on the CPU's kernels.
    again = tmp_path / "again.safetensors"
    r2 = train_teacher(TINY, _cfg(), epochs=1, out=again, lr=1e-9, seed=0, max_train_images=200, command="t",
                       init_from=first)
    assert r2["init_from"]["file"] == str(first) and r2["init_from"]["sha256"] == sha256_file(first)
    assert "init_from" not in r1 or not r1["init_from"]
    a, b = load_teacher(TINY, 1, 10, checkpoint=first), load_teacher(TINY, 1, 10, checkpoint=again)
    convs = [k for k, v in a.state_dict().items() if v.dim() == 4]
    assert all(torch.allclose(a.state_dict()[k], b.state_dict()[k], atol=1e-6) for k in convs)
    with pytest.raises(HantError, match="--init-from .* not found"):
        train_teacher(TINY, _cfg(), epochs=1, out=tmp_path / "x.safetensors", init_from=tmp_path / "missing")


def test_train_teacher_resumes_after_interrupt(tmp_path):
    kw = dict(epochs=2, lr=5e-3, seed=1, max_train_images=96, eval_each_epoch=False, command="x")
    straight = train_teacher(TINY, _cfg(), out=tmp_path / "a.safetensors", **kw)

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch 1/"):
            raise KeyboardInterrupt

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_teacher(TINY, _cfg(), out=out, log=stop_after_first_epoch, **kw)
    partial = out.with_suffix(".partial.safetensors")
    assert partial.exists() and not out.exists()
    with pytest.raises(HantError, match="other settings"):
        train_teacher(TINY, _cfg(), out=out, **{**kw, "lr": 1e-3})
    logged = []
    resumed = train_teacher(TINY, _cfg(), out=out, log=logged.append, **kw)
    assert any(m.startswith("resuming") for m in logged) and not partial.exists()
    assert resumed["history"][0] == straight["history"][0]
    a = read_checkpoint(tmp_path / "a.safetensors")
    b = read_checkpoint(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_train_teacher_bad_arguments(tmp_path):
    with pytest.raises(HantError, match="--epochs"):
        train_teacher(TINY, _cfg(), epochs=0, out=tmp_path / "t.safetensors")
    with pytest.raises(HantError, match=".json goes beside"):
        train_teacher(TINY, _cfg(), epochs=1, out=tmp_path / "t.json")


def test_recipe_flags_round_trip_through_the_command_line():
    from hant.cli import build_parser

    def parsed(flags: str) -> TeacherRecipe:
        args = build_parser().parse_args(["train-teacher", "--out", "t.safetensors", *shlex.split(flags)])
        return TeacherRecipe.from_flags(args)

    assert parsed("") == TeacherRecipe() and TeacherRecipe().flags() == ""
    recipe = TeacherRecipe(epochs=2.5, lr=1e-3, seed=3, max_train_images=500, weight_decay=0.01, label_smoothing=0.0,
                           drop_rate=0.0, drop_path_rate=0.05, augment=False, init_from="/tmp/a b.safetensors")
    assert all(getattr(recipe, f.name) != f.default for f in dataclasses.fields(TeacherRecipe))  # every flag
    assert parsed(recipe.flags()) == recipe
    with pytest.raises(HantError, match="--drop-rate must be in"):
        TeacherRecipe(drop_rate=1.0)
    with pytest.raises(HantError, match="--max-images must be at least 2"):
        parsed("--max-images 1")


def test_moved_names_are_still_importable_from_teacher():
    import hant.teacher
    import hant.teacher_train

    for name in ("evaluate", "train_teacher", "teacher_meta_path", "one_cycle_lr"):
        assert getattr(hant.teacher, name) is getattr(hant.teacher_train, name)
    with pytest.raises(AttributeError):
        hant.teacher.no_such_name


def test_cli_train_teacher(tmp_path, capsys):
    from hant.cli import main

    out = tmp_path / "t.safetensors"
    rc = main(["train-teacher", "--model", TINY, "--data", "synthetic:120", "--input-size", "16", "--epochs", "0.5",
               "--batch-size", "16", "--out", str(out)])
    assert rc == 0 and out.exists()
    assert "test top-1" in capsys.readouterr().out
    assert json.loads(teacher_meta_path(out).read_text())["epochs"] == 0.5
    assert main(["train-teacher", "--model", "timm:nope_net", "--data", "synthetic:120", "--out", str(out)]) == 2
    assert "unknown timm model" in capsys.readouterr().err


def test_evaluate_counts(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]]).view(4, 1, 2, 2)
    y = torch.tensor([0, 1, 1, 1])
    r = evaluate(model, [(x, y)])
    assert r["top1"] == 75.0 and r["n"] == 4 and r["loss"] > 0


def test_cli_train_teacher_regularisation_flags(tmp_path, capsys):
    from hant.cli import main

    out = tmp_path / "t.safetensors"
    rc = main(["train-teacher", "--model", TINY, "--data", "synthetic:120", "--input-size", "16", "--epochs", "0.5",
               "--batch-size", "16", "--drop-rate", "0", "--drop-path-rate", "0", "--weight-decay", "0.01",
               "--label-smoothing", "0", "--no-augment", "--out", str(out)])
    assert rc == 0
    meta = json.loads(teacher_meta_path(out).read_text())
    assert (meta["drop_rate"], meta["drop_path_rate"], meta["weight_decay"], meta["label_smoothing"],
            meta["augment"]) == (0.0, 0.0, 0.01, 0.0, False)
    capsys.readouterr()
    assert main(["train-teacher", "--model", TINY, "--data", "synthetic:120", "--label-smoothing", "1.5",
                 "--out", str(tmp_path / "u.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label-smoothing must be in [0, 1)" in err[0]
    assert not (tmp_path / "u.safetensors").exists()


def test_demo_teacher_trains_stages_in_a_chain_and_reuses_them(tmp_path, monkeypatch):
    from hant.demo import DemoSetup, TeacherStage, _teacher_seconds, demo_teacher

    monkeypatch.setenv("HANT_CACHE", str(tmp_path))
    stages = (TeacherStage(16, TeacherRecipe(epochs=1, lr=5e-3, max_train_images=120)),
              TeacherStage(16, TeacherRecipe(epochs=1, lr=1e-3, max_train_images=120, drop_rate=0.0,
                                             drop_path_rate=0.0)))
    setup = DemoSetup(model=TINY, data="synthetic:200", teacher_stages=stages, space="tiny", distill_images=None,
                      heldout=20, finetune_epochs=0.1, speedups=[2.0], batch_size=1, validate=1, int8=False)
    logged = []
    final, meta = demo_teacher(setup, log=logged.append)
    first = tmp_path / "teachers" / "test_efficientnet-synthetic_20016.safetensors"
    assert final == tmp_path / "teachers" / "test_efficientnet-synthetic_20016-2.safetensors"
    assert first.exists() and final.exists() and sum("stage" in m for m in logged) == 2
    assert meta["init_from"]["file"] == str(first)
    assert (meta["drop_rate"], meta["drop_path_rate"]) == (0.0, 0.0)
    assert "--drop-rate 0 --drop-path-rate 0" in meta["command"] and "--init-from" in meta["command"]
    first_meta = json.loads(first.with_suffix(".json").read_text())
    assert _teacher_seconds(meta) == pytest.approx(meta["train_time_s"] + first_meta["train_time_s"])
    # Cached: nothing is trained again.
    logged.clear()
    again, meta2 = demo_teacher(setup, log=logged.append)
    assert again == final and meta2["sha256"] == meta["sha256"] and len(logged) == 1 and "cached" in logged[0]
    # The last stage lost: only it is retrained, from the first stage that stayed on disk.
    final.unlink()
    logged.clear()
    demo_teacher(setup, log=logged.append)
    assert sum("stage" in m for m in logged) == 1 and "stage 2 of 2" in logged[0]
