import pytest

from hant.config import RunConfig
from hant.errors import HantError
from hant.workspace import atomic_write_text


def test_roundtrip_yaml(tmp_path):
    cfg = RunConfig()
    cfg.data.input_size = 48
    cfg.layers.exclude = ["blocks.0.*"]
    cfg.distill.lr = 0.01
    cfg.save(tmp_path / "config.yaml")
    back = RunConfig.load(tmp_path / "config.yaml")
    assert back == cfg


def test_unknown_key_is_named(tmp_path):
    atomic_write_text(tmp_path / "c.yaml", "distill:\n  lrr: 0.1\n")
    with pytest.raises(HantError, match="distill.lrr"):
        RunConfig.load(tmp_path / "c.yaml")


def test_fine_tuning_augmentation_is_true_false_or_auto(tmp_path):
    assert RunConfig().finetune.augment == "auto"
    atomic_write_text(tmp_path / "c.yaml", "finetune:\n  augment: sometimes\n")
    with pytest.raises(HantError, match="finetune.augment must be true, false or auto"):
        RunConfig.load(tmp_path / "c.yaml")


def test_wrong_type_is_named(tmp_path):
    atomic_write_text(tmp_path / "c.yaml", "data:\n  input_size: big\n")
    with pytest.raises(HantError, match="data.input_size"):
        RunConfig.load(tmp_path / "c.yaml")


def test_corrupt_yaml_is_one_line(tmp_path):
    atomic_write_text(tmp_path / "c.yaml", "data: [unclosed\n")
    with pytest.raises(HantError, match="not valid YAML") as e:
        RunConfig.load(tmp_path / "c.yaml")
    assert "\n" not in str(e.value)
