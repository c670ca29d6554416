"""Train a teacher from a model source on a dataset, and measure one.

`TeacherRecipe` states the recipe once: `train_teacher` takes it, `hant train-teacher`
makes its flags from it, and the demo's teacher stages hold one each. Progress is saved
to `<out>.partial.safetensors`, so an interrupted run resumes where it stopped.

torch is imported inside the functions, so that the command line can read the recipe's
flags without loading it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from hant.errors import HantError
from hant.schedule import one_cycle_lr

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from hant.config import DataConfig
    from hant.data import Splits

PARTIAL_VERSION = 1


def _flag(default: Any, flag: str, help: str, kind: type | None = None) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help, "type": kind or type(default)})


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained, given its model source and data: every setting that decides its weights.

    AdamW (decay on weights only), the one-cycle LR of `hant.schedule` peaking at `lr`,
    label smoothing, random crop (pad input_size/16) and horizontal flip, dropout and
    drop-path for timm models. `epochs` may be fractional; `max_train_images` samples that
    many train images (with `seed`); `init_from` starts from those weights instead of random
    ones (a second, gentler cycle on a teacher that was still improving). Each field is the
    `hant train-teacher` flag named in its metadata. Raises HantError for a value out of range.
    """

    epochs: float = _flag(10.0, "--epochs", "passes over the train split; may be fractional")
    lr: float = _flag(3e-3, "--lr", "peak learning rate")
    seed: int = _flag(0, "--seed", "seed of the weights, batch order and augmentation")
    max_train_images: int | None = _flag(None, "--max-images", "cap train images (for quick runs)", int)
    weight_decay: float = _flag(0.05, "--weight-decay", "AdamW weight decay on weights (not norms, biases)")
    label_smoothing: float = _flag(0.1, "--label-smoothing", "label smoothing of the cross-entropy")
    drop_rate: float = _flag(0.2, "--drop-rate", "dropout before the classifier (timm models)")
    drop_path_rate: float = _flag(0.1, "--drop-path-rate", "stochastic depth (timm models that have it)")
    augment: bool = _flag(True, "--no-augment", "no random crop and flip")
    init_from: str | Path | None = _flag(None, "--init-from",
                                         "start from these weights (e.g. another cycle at a lower --lr)", str)

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise HantError(f"--epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise HantError(f"--lr must be positive, got {self.lr}")
        for name, high in (("weight_decay", float("inf")), ("label_smoothing", 1.0), ("drop_rate", 1.0),
                           ("drop_path_rate", 1.0)):
            value = getattr(self, name)
            if not 0.0 <= value < high:
                raise HantError(f"{_FLAGS[name]} must be in [0, {high:g}), got {value}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise HantError(f"--max-images must be at least 2, got {self.max_train_images}")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to `parser`, with the field's default (read back by `from_flags`)."""
        for f in fields(cls):
            if f.metadata["type"] is bool:  # a switch that turns a default-on setting off
                parser.add_argument(f.metadata["flag"], dest=f.name, action="store_false", help=f.metadata["help"])
            else:
                parser.add_argument(f.metadata["flag"], dest=f.name, type=f.metadata["type"], default=f.default,
                                    metavar=f.metadata["flag"][2:].upper().replace("-", "_"), help=f.metadata["help"])

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> TeacherRecipe:
        """The recipe of parsed `add_flags` flags. Raises HantError for a value out of range."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def flags(self) -> str:
        """The `hant train-teacher` flags that give this recipe (fields at their defaults are left out)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                parts.append(f.metadata["flag"])
            elif isinstance(value, float):
                short = f"{value:g}"
                parts.append(f"{f.metadata['flag']} {short if float(short) == value else repr(value)}")
            else:
                parts.append(f"{f.metadata['flag']} {shlex.quote(str(value))}")
        return " ".join(parts)


_FLAGS = {f.name: f.metadata["flag"] for f in fields(TeacherRecipe)}


def teacher_meta_path(out: str | Path) -> Path:
    """The JSON written beside a teacher's weights (same name, .json suffix)."""
    return Path(out).with_suffix(".json")


# ---------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, loader: Iterable, desc: str | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of `model` over the (x, y) batches of `loader`.

    The model is put in eval mode. `desc` shows a progress bar with that label. Returns
    {"top1", "loss", "n"}; raises HantError when `loader` yields no images.
    """
    import torch
    import torch.nn.functional as F

    from hant.data import is_channels_last

    model.eval()
    cl = is_channels_last(model)
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, 0
    bar = _bar(total=_len_images(loader), desc=desc) if desc else None
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, memory_format=torch.channels_last) if cl else x.to(device)
            y = y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
            if bar is not None:
                bar.update(len(y))
    if bar is not None:
        bar.close()
    if n == 0:
        raise HantError("evaluation got no images; the split is empty")
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}


def _len_images(loader) -> int | None:
    ds = getattr(loader, "dataset", None)
    return len(ds) if ds is not None else None


def _bar(total: int | None, desc: str, unit: str = "img"):
    from tqdm.auto import tqdm

    # A log file gets a line every 30 s rather than a carriage-return storm.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5 if interactive else 30.0,
                file=sys.stderr)


# ---------------------------------------------------------------- training


def train_teacher(source: str, data_cfg: DataConfig, recipe: TeacherRecipe | None = None, *,
                  out: str | Path = "teacher.safetensors", resume: bool = True, checkpoint_minutes: float = 10.0,
                  eval_each_epoch: bool = True, command: str | None = None,
                  log: Callable[[str], None] | None = None, **recipe_fields: Any) -> dict[str, Any]:
    """Train a teacher from `source` on `data_cfg` with `recipe` and save it.

    Keyword arguments named like `TeacherRecipe` fields (epochs=, lr=, ...) override the
    recipe's (the default recipe when none is given). Trains on the train split only (the
    held-out split stays unseen) with `data_cfg.batch_size`, channels_last; reports held-out
    top-1 after each epoch (`eval_each_epoch`) and test top-1 at the end. Writes `out`
    (safetensors) and `out` with a .json suffix (source, in_chans, num_classes, input_size,
    data, mean, std, test_top1, epochs, train_time_s, images_per_s, command, the recipe,
    init_from with its sha256, ...), and returns that dict. Progress is saved to
    `out`.partial.safetensors at each epoch end, every `checkpoint_minutes` and on Ctrl-C;
    a rerun with the same settings resumes from it (unless not `resume`). Raises HantError
    for bad arguments, data or model sources, or a partial file from other settings.
    """
    from hant.data import load_data
    from hant.workspace import save_safetensors, write_json

    recipe = dataclasses.replace(recipe or TeacherRecipe(), **recipe_fields)
    out = Path(out).expanduser()
    if out.suffix == ".json":
        raise HantError(f"--out {out} must be the weights file (e.g. teacher.safetensors); the .json goes beside it")
    log = log or _tqdm_write
    command = command if command is not None else _command_line()

    splits = load_data(data_cfg)
    train = _train_images(splits.train, recipe)
    steps = _Steps.of(len(train), data_cfg.batch_size, recipe.epochs)
    model, regularised, init_sha = _build_model(source, splits, recipe)
    opt = _optimiser(model, recipe)

    signature = {"source": source, "data": splits.spec, "input_size": splits.input_size, "in_chans": splits.in_chans,
                 "num_classes": splits.num_classes, "heldout": len(splits.heldout), "seed": recipe.seed,
                 "data_seed": data_cfg.seed, "epochs": float(recipe.epochs), "lr": recipe.lr,
                 "batch_size": steps.batch, "train_images": len(train), "weight_decay": recipe.weight_decay,
                 "label_smoothing": recipe.label_smoothing, "drop_rate": recipe.drop_rate,
                 "drop_path_rate": recipe.drop_path_rate, "augment": recipe.augment}
    if init_sha is not None:
        signature["init_from_sha256"] = init_sha
    partial = _Partial(out.with_suffix(".partial.safetensors"), model, opt, signature)
    state = {"step": 0, "elapsed_s": 0.0, "history": []}
    if resume and partial.path.exists():
        state = partial.load()
        log(f"resuming from {partial.path} at step {state['step']}/{steps.total}")

    train_time = _fit(model, opt, train, splits, recipe, steps, state, partial, eval_each_epoch=eval_each_epoch,
                      checkpoint_minutes=checkpoint_minutes, log=log)

    meta = _describe(model, source, data_cfg, splits, recipe, steps, len(train), regularised, init_sha,
                     train_time, command, state["history"])
    sha = save_safetensors(out, model.state_dict(), metadata={"source": source, "in_chans": str(splits.in_chans),
                                                               "num_classes": str(splits.num_classes),
                                                               "input_size": str(splits.input_size)})
    meta["sha256"] = sha
    write_json(teacher_meta_path(out), meta)
    partial.path.unlink(missing_ok=True)
    return meta


def _train_images(train, recipe: TeacherRecipe):
    """The train split, or `recipe.max_train_images` of it sampled with the recipe's seed."""
    import torch

    cap = recipe.max_train_images
    if cap is not None and cap < len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))[:cap].sort().values
        train = train.subset(pick) if hasattr(train, "subset") else torch.utils.data.Subset(train, pick.tolist())
    if len(train) < 2:
        raise HantError(f"the train split has {len(train)} image(s); use more data")
    return train


@dataclass(frozen=True)
class _Steps:
    """The step arithmetic: batch size, steps per epoch, and steps in all."""

    batch: int
    per_epoch: int
    total: int

    @classmethod
    def of(cls, n_train: int, batch_size: int, epochs: float) -> _Steps:
        batch = max(2, min(batch_size, n_train))  # BatchNorm needs 2 per batch
        per_epoch = n_train // batch
        return cls(batch, per_epoch, max(1, int(round(epochs * per_epoch))))

    @property
    def epochs(self) -> int:
        """Epochs begun, the last one possibly cut short."""
        return math.ceil(self.total / self.per_epoch)


def _build_model(source: str, splits: Splits, recipe: TeacherRecipe) -> tuple[nn.Module, bool, str | None]:
    """The seeded network in channels_last, from `recipe.init_from` when given.

    Returns (model, whether it takes dropout and drop-path, sha256 of init_from or None).
    """
    import torch

    from hant.teacher import create_model, load_checkpoint, parse_source
    from hant.workspace import sha256_file

    torch.manual_seed(recipe.seed)
    regularised = parse_source(source)[0] == "timm"
    timm_kwargs = {"drop_rate": recipe.drop_rate, "drop_path_rate": recipe.drop_path_rate} if regularised else None
    try:
        model = create_model(source, splits.in_chans, splits.num_classes, timm_kwargs=timm_kwargs)
    except TypeError:  # a timm family without drop path
        model = create_model(source, splits.in_chans, splits.num_classes, timm_kwargs={"drop_rate": recipe.drop_rate})
    init_sha = None
    if recipe.init_from is not None:
        if not Path(recipe.init_from).is_file():
            raise HantError(f"--init-from {recipe.init_from} not found; pass an existing weights file")
        load_checkpoint(model, recipe.init_from)
        init_sha = sha256_file(recipe.init_from)
    return model.to(memory_format=torch.channels_last), regularised, init_sha


def _optimiser(model: nn.Module, recipe: TeacherRecipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on weights only (not norms and biases)."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)


class _Clock:
    """Training seconds: those of earlier sessions plus this one's, evaluation left out."""

    def __init__(self, before: float):
        self.before = before
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t


def _fit(model: nn.Module, opt: torch.optim.Optimizer, train, splits: Splits, recipe: TeacherRecipe, steps: _Steps,
         state: dict, partial: _Partial, *, eval_each_epoch: bool, checkpoint_minutes: float,
         log: Callable[[str], None]) -> float:
    """Train from `state` ({"step", "elapsed_s", "history"}) to the last step, appending one record
    per epoch to its history; return the training seconds. On Ctrl-C the progress is saved, then
    KeyboardInterrupt is raised again."""
    from hant.data import make_loader

    step, history = state["step"], state["history"]
    clock = _Clock(state["elapsed_s"])
    augment = _augmenter(splits, recipe)
    bar = _bar(total=steps.total * steps.batch, desc="train-teacher")
    bar.update(step * steps.batch)
    last_save = time.perf_counter()

    def save() -> None:
        partial.save({"step": step, "elapsed_s": clock.seconds(), "history": history})

    try:
        while step < steps.total:
            epoch = step // steps.per_epoch
            model.train()
            loss_sum = correct = seen = 0
            for x, y in _epoch_batches(train, steps.batch, recipe.seed + epoch, skip=step - epoch * steps.per_epoch):
                if step >= steps.total:
                    break
                loss, hits = _train_step(model, opt, x, y, step, steps.total, recipe, augment)
                step += 1
                loss_sum += loss * len(y)
                correct += hits
                seen += len(y)
                bar.update(len(y))
                bar.set_postfix(epoch=f"{epoch + 1}/{steps.epochs}", loss=f"{loss_sum / seen:.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
                if checkpoint_minutes and time.perf_counter() - last_save > 60 * checkpoint_minutes:
                    save()
                    last_save = time.perf_counter()
            record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen),
                      "train_top1": 100.0 * correct / max(1, seen)}
            if eval_each_epoch and len(splits.heldout) > 0:
                with clock.paused():  # evaluation is not training time
                    record["heldout_top1"] = evaluate(model, make_loader(splits.heldout, 256))["top1"]
            history.append(record)
            log(f"epoch {epoch + 1}/{steps.epochs}: train loss {record['train_loss']:.4f}, "
                f"train top-1 {record['train_top1']:.2f}%"
                + (f", held-out top-1 {record['heldout_top1']:.2f}%" if "heldout_top1" in record else ""))
            if step < steps.total:
                save()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        bar.close()
        save()
        log(f"saved progress to {partial.path}; rerun the same command to resume")
        raise
    bar.close()
    return clock.seconds()


def _augmenter(splits: Splits, recipe: TeacherRecipe) -> Callable | None:
    """Random crop (padding input_size/16) and flip, or None when the recipe has no augmentation."""
    if not recipe.augment:
        return None
    from hant.data import random_crop_flip

    pad = max(1, splits.input_size // 16)
    fill = [-m / s for m, s in zip(splits.mean, splits.std)]  # black, after normalisation
    return lambda x, gen: random_crop_flip(x, pad, gen, fill=fill)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, step: int, total: int, recipe: TeacherRecipe,
                augment: Callable | None) -> tuple[float, int]:
    """One optimiser step at `step` of `total`; returns (loss, correct predictions)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout/drop-path: reproducible on resume
    if augment is not None:
        x = augment(x, gen)
    x = x.contiguous(memory_format=torch.channels_last)
    for g in opt.param_groups:
        g["lr"] = one_cycle_lr(step, total, recipe.lr)
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    if not torch.isfinite(loss):
        raise HantError(f"training diverged (loss {float(loss)}) at step {step}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def _epoch_batches(train, batch: int, seed: int, skip: int) -> Iterator:
    from hant.data import TensorImageDataset, make_loader

    if isinstance(train, TensorImageDataset):
        it = train.batches(batch, shuffle=True, seed=seed, drop_last=True)
    else:
        it = iter(make_loader(train, batch, shuffle=True, seed=seed, drop_last=True))
    for i, b in enumerate(it):
        if i >= skip:
            yield b


def _describe(model: nn.Module, source: str, data_cfg: DataConfig, splits: Splits, recipe: TeacherRecipe,
              steps: _Steps, n_train: int, regularised: bool, init_sha: str | None, train_time: float, command: str,
              history: list) -> dict[str, Any]:
    """The teacher's JSON (less its sha256): test and held-out accuracy, the data, the recipe, the cost."""
    import torch

    from hant.data import make_loader

    test = evaluate(model, make_loader(splits.test, 256), desc="test")
    heldout = evaluate(model, make_loader(splits.heldout, 256)) if len(splits.heldout) else None
    return {
        "source": source,
        "in_chans": splits.in_chans,
        "num_classes": splits.num_classes,
        "input_size": splits.input_size,
        "data": splits.spec,
        "data_seed": data_cfg.seed,
        "heldout": len(splits.heldout),
        "mean": splits.mean,
        "std": splits.std,
        "test_top1": round(test["top1"], 4),
        "test_loss": round(test["loss"], 6),
        "heldout_top1": round(heldout["top1"], 4) if heldout else None,
        "init_from": {"file": str(recipe.init_from), "sha256": init_sha} if recipe.init_from is not None else None,
        "epochs": recipe.epochs,
        "steps": steps.total,
        "batch_size": steps.batch,
        "train_images": n_train,
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "label_smoothing": recipe.label_smoothing,
        "drop_rate": recipe.drop_rate if regularised else 0.0,
        "drop_path_rate": recipe.drop_path_rate if regularised else 0.0,
        "augment": recipe.augment,
        "seed": recipe.seed,
        "train_time_s": round(train_time, 2),
        "images_per_s": round(steps.total * steps.batch / max(train_time, 1e-9), 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command,
        "history": history,
    }


# ---------------------------------------------------------------- partial checkpoints


@dataclass
class _Partial:
    """Progress beside the output: weights, optimiser state and {"step", "elapsed_s", "history"},
    under the signature of the settings that made it (a rerun with others is refused)."""

    path: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    signature: dict

    def save(self, state: dict) -> None:
        import torch

        from hant.workspace import save_safetensors

        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        meta = {"version": PARTIAL_VERSION, "signature": self.signature, **state}
        save_safetensors(self.path, tensors, metadata={"hant_partial": json.dumps(meta)})

    def load(self) -> dict:
        """Load the weights and optimiser state into the model and optimiser; return the state."""
        from safetensors import safe_open

        from hant.teacher import check_state_dict
        from hant.workspace import load_safetensors

        path, signature = self.path, self.signature
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("hant_partial", "{}"))
        except Exception as e:  # safetensors raises its own error types
            raise HantError(f"{path} is unreadable ({e.__class__.__name__}); delete it to start over") from e
        if meta.get("signature") != signature:
            diff = next((k for k in signature if (meta.get("signature") or {}).get(k) != signature[k]), "version")
            raise HantError(f"{path} was saved with other settings ({diff}); rerun with the same settings or delete it")
        tensors = load_safetensors(path)
        sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        check_state_dict(self.model, sd, str(path))
        self.model.load_state_dict(sd)
        ostate: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                ostate.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": ostate, "param_groups": self.opt.state_dict()["param_groups"]})
        return {"step": int(meta["step"]), "elapsed_s": float(meta["elapsed_s"]), "history": list(meta["history"])}


def _tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("hant", "__main__.py", "cli.py"):
        argv[0] = "hant"
    return shlex.join(argv)
