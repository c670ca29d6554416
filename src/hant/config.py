"""Typed run configuration: dataclasses, read from and written to YAML.

Each stage reads its own section. Unknown keys are refused with a message that names
them, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from hant.errors import HantError


@dataclass
class ModelConfig:
    source: str = "timm:efficientnet_b0"  # timm:NAME | torchvision:NAME | package.module:factory
    checkpoint: str | None = None
    trust_pickle: bool = False
    # No trained weights: `init` seeds the network (RunConfig.seed), saves it into the run
    # folder as its checkpoint, and every stage and process loads those same weights.
    random_init: bool = False


@dataclass
class DataConfig:
    spec: str = "fashion-mnist"  # fashion-mnist | imagefolder:/path | synthetic:N
    data_dir: str | None = None
    input_size: int = 64
    heldout: int = 5000  # images taken from the train split for scores; never trained on
    batch_size: int = 128
    workers: int = 0
    seed: int = 0
    # Filled in by init from the dataset so that the run can be rebuilt without it.
    in_chans: int | None = None
    num_classes: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class LayersConfig:
    include: list[str] = field(default_factory=list)  # globs; empty means the default discovery
    exclude: list[str] = field(default_factory=list)


@dataclass
class DistillConfig:
    images: int | None = None  # images per candidate; None means `epochs` epochs
    # A share of an epoch: the `default` space on EfficientNet-B0 at 64x64 costs ~5 GFLOP per
    # training image over its 457 candidates. 2% of Fashion-MNIST is ~1100 images per candidate
    # (see bench/results/phase1.json); teacher-initialised candidates gain little beyond it
    # (held-out NMSE 0.287 at 1k images, 0.260 at 4k).
    epochs: float = 0.02
    # The floor under a budget given in epochs: 2% of a small set is a single optimiser step
    # (a ResNet-18 on 1,600 images got 26 images per candidate and assembled its 2x and 3x
    # students at 37% and 9%; with ~5 epochs per candidate, 95%). 1024 (8 steps) is what 2% of
    # Fashion-MNIST gives (1,100), so large sets keep their cost; the small-data benchmark
    # (bench/small_data.py --distill-images) measures whether small sets need more.
    min_images: int = 1024
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-5
    max_memory_mb: int | None = None  # None: a safe share of RAM
    checkpoint_minutes: float = 5.0
    heldout_images: int | None = 512  # held-out images for each candidate's NMSE; None: the whole split
    # `hant redistill` (and `accelerate` before fine-tuning): training images per re-distilled
    # layer of a plan. 2048 on the demo run took the plans' mean held-out NMSE from 0.40/0.84/1.08
    # to 0.23/0.56/0.71 at 2x/3x/4x in about a minute per plan. More images fit the layers
    # better but scale the student's logits away from the teacher's (KL 0.74 at 2048, 3.43 at
    # 8192 on the batch-64 3x plan), which cost accuracy until fine-tuning fitted the output
    # layer first (finetune.head_fit); with it, 8192 reached 92.82% against 92.71% after 2
    # epochs (control 93.13%; one seed each) for 209 s of re-distillation against 120 s
    # (bench/results/recovery_5cycle.json).
    redistill_images: int = 8192
    # A re-distilled layer that the plan follows directly with skipped layers learns the
    # teacher's output after the last of them (the skips pass its output on unchanged), so it
    # stands in for the layers the plan removed. Off: on the demo run's batch-64 plans it took
    # the NMSE at the last block from 0.82 to 0.58 (3x) and 1.03 to 0.84 (4x), but the assembled
    # students were 0.5 points worse and after 2 epochs the same within noise (3x 92.74% against
    # 92.82%, 4x 92.29% against 92.32%; bench/results/recovery_5cycle_speedups.json).
    redistill_through_skips: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.min_images, bool) or not isinstance(self.min_images, int) or self.min_images < 0:
            raise HantError(f"distill.min_images must be a whole number of images, 0 or more; "
                            f"got {self.min_images!r}")


@dataclass
class LatencyConfig:
    # One thread by default: the target then times with the thread's CPU clock, which does not
    # count time preempted by other processes, so tables are stable on a shared machine.
    # None: every core (and the wall clock); time for the deployment's own thread count.
    threads: int | None = 1
    warmup: int = 5
    # At least 100 samples per item: a median of fewer, even with a narrow bootstrap
    # interval, follows the load of the moment (bench/timing.py: with 15, a tiny run's
    # validation erred 2-8% under a neighbouring process, tau 0.73-0.88; with 100, 3-4%, tau
    # 0.88-0.94). Small ops cost microseconds, so tables stay fast; time_cap_s bounds big ones.
    min_repeats: int = 100
    max_repeats: int = 600
    time_cap_s: float = 600.0
    # Whole-network timings (the fixed part, validation, plan checks, measure, export) last at
    # least this long; table entries do not need it. A sub-millisecond network converges
    # in a fraction of a second, which samples one moment of a shared machine's speed: a plan
    # timed by separate processes minutes apart then disagreed by up to 13% in speedup
    # (bench/timing.py). Spanning seconds averages over those swings.
    min_time_s: float = 3.0


@dataclass
class ScoreConfig:
    method: str = "eval"  # eval: replace one layer and run the held-out split | distill: phase-1 held-out NMSE
    objective: str = "d_loss"  # d_loss | d_acc | kl
    images: int | None = None  # None: the whole held-out split


FEATURE_LOSSES = ("none", "nmse", "cosine")
# finetune.augment "auto" augments a schedule only past this many passes over the train split.
AUTO_AUGMENT_PASSES = 2.0


@dataclass
class FinetuneConfig:
    epochs: float = 2.0
    # The floor under `epochs` in optimiser steps when the epochs come from this config (not
    # from --epochs): 2 epochs of 1,200 images are 37 steps; 400 steps of 64 are the 25,600
    # images the floor gave at batch 128 (0.47 epoch of Fashion-MNIST, whose 2 epochs are
    # 1,718 steps, unchanged).
    min_steps: int = 400
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # 64 rather than 128: twice the steps in the same epochs. On the demo run's batch-64 plans
    # after 2 epochs, 3x 92.92% (was 92.82%) and 4x 92.58% (was 92.32%), while the teacher's
    # control stayed at 93.12% (93.13%); each epoch also ran ~10% faster on 2 CPU cores
    # (bench/results/recovery_batch.json).
    batch_size: int = 64
    kd_weight: float = 1.0  # KL on the logits at `temperature`
    ce_weight: float = 0.5  # cross-entropy on the labels (the label-loss weight; 0 turns it off)
    temperature: float = 2.0
    # Feature-map distillation: feature_weight * mean over the plan's layers of the distance
    # between the student's and the teacher's outputs there, per sample: `nmse`
    # ||s - t||^2 / ||t||^2 or `cosine` 1 - cos(s, t). "none" (logits only) is the default:
    # on the demo run nmse (weight 1) lost to it at every speedup after a quarter epoch,
    # 2x 90.27 vs 90.46%, 3x 87.76 vs 88.74%, 4x 84.61 vs 86.40% (bench/results/recovery.json).
    feature_loss: str = "none"  # none | nmse | cosine
    feature_weight: float = 1.0
    bn_batches: int = 20
    warmup: float = 0.05  # fraction of the steps with a linear LR warm-up before the cosine decay
    # Random crop (pad 1/16 of the side) and horizontal flip: true, false, or "auto", which
    # augments only a schedule that passes over the train split more than
    # AUTO_AUGMENT_PASSES times (small data, whose step floor repeats each image many times).
    # On the demo run's batch-64 3x student, 2 epochs (2 passes) without it reached 92.27% and
    # 92.28% (two seeds) against 91.83% with it (bench/results/recovery_4cycle.json).
    augment: bool | str = "auto"
    # Before the first step, refit the output layer to the teacher's logits (ridge regression
    # on the `bn_batches` train batches; `hant.headfit`), kept only when it lowers the KL on
    # the batches it was not fitted on. On the demo run's batch-64 3x student (2 epochs) it
    # took KL 0.74 -> 0.17 before the first step and the student from 92.43% to 92.71%
    # against a 93.13% control (bench/results/recovery.json).
    head_fit: bool = True
    checkpoint_minutes: float = 5.0  # also checkpoint within an epoch this often
    # `hant pick`: train images of the short distillation each candidate plan gets before the
    # best on held-out images goes on to fine-tuning (32 steps of 64). `accelerate` does not
    # pick by default (K = 1): on the demo run the pick of 4 plans did not beat the
    # selection's best after a quarter epoch, 2x 90.33 vs 90.46%, 3x 88.49 vs 88.74%, 4x
    # 86.27 vs 86.40% (bench/results/recovery.json).
    pick_images: int = 2048

    def __post_init__(self) -> None:
        if self.feature_loss not in FEATURE_LOSSES:
            raise HantError(f"finetune.feature_loss must be one of {', '.join(FEATURE_LOSSES)}, "
                            f"got {self.feature_loss!r}")
        if not self.feature_weight >= 0:
            raise HantError(f"finetune.feature_weight must be at least 0, got {self.feature_weight!r}")
        if self.augment not in (True, False, "auto"):
            raise HantError(f"finetune.augment must be true, false or auto, got {self.augment!r}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise HantError(f"finetune.min_steps must be a whole number of steps, 0 or more; got {self.min_steps!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: str = "default"
    layers: LayersConfig = field(default_factory=LayersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RunConfig":
        """Build from a dict; missing keys take defaults. Raises HantError on unknown keys or bad types."""
        return _from_dict(cls, d or {}, "")

    def save(self, path: str | Path) -> None:
        """Write as YAML atomically."""
        from hant.workspace import write_yaml

        write_yaml(path, {"version": 1, **self.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a YAML config (safe loader). Raises HantError on malformed YAML or unknown keys."""
        from hant.workspace import read_yaml

        d = read_yaml(path)
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise HantError(f"{path} must hold a mapping of config sections, not {type(d).__name__}")
        d = dict(d)
        d.pop("version", None)
        try:
            return cls.from_dict(d)
        except HantError as e:
            raise HantError(f"{path}: {e}") from None


def _from_dict(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise HantError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise HantError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    # Only the handful of types used above: int, float, bool, str, list[...] and Optional.
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _check_type(value, a, key)
            except HantError:
                continue
        raise HantError(f"config key '{key}' must be {' or '.join(getattr(a, '__name__', str(a)) for a in inner)}, "
                        f"got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise HantError(f"config key '{key}' must be a list")
        return [_check_type(v, args[0], key) for v in value] if args else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint in (int, float, bool, str):
        raise HantError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    return value
