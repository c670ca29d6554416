"""Teachers: build one from a source string, load its weights, or train one.

A source names a network factory:

    timm:NAME                  any timm model (pretrained=False: nothing is downloaded)
    torchvision:NAME           any torchvision classification model (first conv adapted to in_chans)
    package.module:factory     a callable returning an nn.Module, given in_chans/num_classes if it takes them
    memory:KEY                 a live nn.Module registered by `hant.accelerate` in this process
                               (an architecture no source string can rebuild)

Weights come from safetensors, or from a torch checkpoint read with `weights_only=True`;
a file that needs unpickling is refused unless the caller trusts it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import json
import math
import pickle
import shlex
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from hant.config import DataConfig
from hant.errors import HantError

SOURCE_FORMS = "timm:NAME, torchvision:NAME or package.module:factory"
_IN_CHANS_NAMES = ("in_chans", "in_channels", "in_chs")
# Wrappers other training scripts put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PARTIAL_VERSION = 1
# Models handed over in memory (`register_model`), by key. Process-local on purpose: the
# architecture of an arbitrary nn.Module cannot be written down, only kept alive; a run
# that uses one can be resumed by the process that registers the same model again.
_IN_MEMORY: dict[str, nn.Module] = {}


# ---------------------------------------------------------------- building


def parse_source(source: str) -> tuple[str, str]:
    """Split a model source into (kind, name): kind is 'timm', 'torchvision' or 'factory'.

    Raises HantError when the string has none of the accepted forms.
    """
    kind, sep, name = (source or "").partition(":")
    if not sep or not kind or not name:
        hint = f"; did you mean timm:{source}?" if source and _timm_is_model(source) else ""
        raise HantError(f"model source '{source}' must be {SOURCE_FORMS}{hint}")
    if kind in ("timm", "torchvision", "memory"):
        return kind, name
    return "factory", source


def create_model(source: str, in_chans: int, num_classes: int) -> nn.Module:
    """Build an untrained network from `source` for `in_chans` input channels and `num_classes` outputs.

    Raises HantError for an unknown name (with close matches) or a factory that cannot be imported.
    """
    return _create(source, in_chans, num_classes)


def _create(source: str, in_chans: int, num_classes: int, timm_kwargs: dict | None = None) -> nn.Module:
    kind, name = parse_source(source)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise HantError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                                 **(timm_kwargs or {}))
    if kind == "torchvision":
        return _torchvision_model(name, in_chans, num_classes)
    if kind == "memory":
        if name not in _IN_MEMORY:
            raise HantError(f"model source 'memory:{name}' is a model held by the Python process that started this "
                            "run; call hant.accelerate(model, ...) again with that model, or start the run from a "
                            f"{SOURCE_FORMS} source")
        return copy.deepcopy(_IN_MEMORY[name])
    return _factory_model(name, in_chans, num_classes)


def architecture_digest(model: nn.Module) -> str:
    """A short hash of a model's class and parameter/buffer names and shapes (not its values)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    return h.hexdigest()[:12]


def register_model(model: nn.Module) -> str:
    """Keep a copy of `model` (CPU, eval mode) buildable as `memory:KEY` in this process; return the source.

    The key is the class name and `architecture_digest`, so registering the same
    architecture again (in a later process, to resume a run) gives the same source.
    """
    key = f"{type(model).__name__}-{architecture_digest(model)}"
    _IN_MEMORY[key] = copy.deepcopy(model).cpu().eval()
    return f"memory:{key}"


def infer_source(model: nn.Module, in_chans: int, num_classes: int) -> str | None:
    """The `timm:` or `torchvision:` source that rebuilds `model`'s architecture, or None.

    A timm model names its architecture in `pretrained_cfg`; a torchvision model is matched
    against the builders that return its class. A match must have the same class and the
    same parameter names and shapes; the caller should still compare outputs.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def same(candidate: nn.Module) -> bool:
        return type(candidate) is type(model) and {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == want

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if arch:
        try:
            if same(create_model(f"timm:{arch}", in_chans, num_classes)):
                return f"timm:{arch}"
        except HantError:
            pass
    if type(model).__module__.startswith("torchvision.models"):
        import torchvision.models as tvm

        for name in tvm.list_models(module=tvm):
            if inspect.signature(tvm.get_model_builder(name)).return_annotation is not type(model):
                continue
            try:
                if same(create_model(f"torchvision:{name}", in_chans, num_classes)):
                    return f"torchvision:{name}"
            except HantError:
                continue
    return None


def _timm_is_model(name: str) -> bool:
    try:
        import timm

        return timm.is_model(name)
    except ImportError:
        return False


def _suggest(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = [k for k in known if name.lower() in k.lower()][:5] or difflib.get_close_matches(name, known, n=5)
    return f"; close matches: {', '.join(close)}" if close else "; check the spelling"


def _torchvision_model(name: str, in_chans: int, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)  # classification models only
    if name not in names:
        raise HantError(f"unknown torchvision model '{name}'{_suggest(name, names)}")
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise HantError(f"torchvision:{name} cannot be built with num_classes={num_classes} ({e})") from e
    if in_chans != 3:
        _replace_first_conv(model, in_chans, f"torchvision:{name}")
    return model


def _replace_first_conv(model: nn.Module, in_chans: int, label: str) -> None:
    # torchvision models are written for RGB; the first conv that reads 3 channels is the
    # stem. With no pretrained weights there is nothing to adapt, only a shape to change.
    for qual, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            groups=1 if mod.groups == 1 else in_chans, bias=mod.bias is not None,
                            padding_mode=mod.padding_mode)
            parent_name, _, child = qual.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise HantError(f"{label} has no 3-channel input conv to adapt to {in_chans} channels; use 3-channel data")


def _factory_model(spec: str, in_chans: int, num_classes: int) -> nn.Module:
    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HantError(f"cannot import '{module_name}' for model source '{spec}' ({e}); check the module path "
                        f"or use {SOURCE_FORMS}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise HantError(f"'{module_name}' has no callable '{attr}'; model source must be {SOURCE_FORMS}")
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    chans_name = next((n for n in _IN_CHANS_NAMES if n in params), "in_chans" if takes_any else None)
    if chans_name:
        kwargs[chans_name] = in_chans
    if "num_classes" in params or takes_any:
        kwargs["num_classes"] = num_classes
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise HantError(f"'{spec}' returned {type(model).__name__}, not a torch nn.Module")
    return model


# ---------------------------------------------------------------- weights


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch checkpoint, unwrapping {"state_dict"/"model": ...}.

    Torch files are read with `weights_only=True`; one that needs unpickling raises HantError
    unless `trust_pickle`. A `module.` prefix (DataParallel) is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise HantError(f"checkpoint {path} does not exist; check --checkpoint")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from hant.workspace import load_safetensors

        return _strip_prefix(load_safetensors(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            if "Unsupported global" in str(e):
                raise HantError(f"checkpoint {path} holds pickled Python objects; pass --trust-pickle if you "
                                "trust the file") from None
            raise HantError(f"checkpoint {path} is not a safetensors or torch file; check --checkpoint") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # arbitrary code ran; report whatever it raised on one line
            raise HantError(f"checkpoint {path} could not be unpickled ({e2.__class__.__name__}: {e2})") from e2
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise HantError(f"checkpoint {path} is not a readable torch file ({e.__class__.__name__}); check it") from e
    return _strip_prefix(_unwrap(obj, path))


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], (dict, nn.Module))), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise HantError(f"checkpoint {path} holds no state dict (expected tensors, or a dict with 'state_dict' or "
                    "'model'); save model.state_dict()")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_checkpoint(model: nn.Module, path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Load weights from `path` into `model` (in place) and return it.

    Raises HantError naming the first key that is missing, unexpected or of another shape.
    """
    sd = read_checkpoint(path, trust_pickle=trust_pickle)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=False)
    return model


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise HantError naming the first key of `sd` that does not fit `model` (missing, extra, shape)."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            # Old checkpoints lack BatchNorm's counter; the running statistics are what matter.
            if k.endswith("num_batches_tracked"):
                continue
            raise HantError(f"{what} does not fit the model: key '{k}' is missing; check --model and the data's "
                            "channels/classes")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise HantError(f"{what} does not fit the model: key '{k}' has shape {tuple(sd[k].shape)} in the file "
                            f"but {tuple(v.shape)} in the model; check --model and the data's channels/classes")
    extra = [k for k in sd if k not in own]
    if extra:
        raise HantError(f"{what} does not fit the model: unexpected key '{extra[0]}'; check --model")


def load_teacher(source: str, in_chans: int, num_classes: int, checkpoint: str | Path | None = None,
                 trust_pickle: bool = False) -> nn.Module:
    """Build the network from `source`, load `checkpoint` when given, and return it in eval mode.

    Raises HantError for an unknown source, an unreadable or untrusted file, or mismatching weights.
    """
    model = create_model(source, in_chans, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, trust_pickle=trust_pickle)
    return model.eval()


def teacher_meta_path(out: str | Path) -> Path:
    """The JSON written beside a teacher's weights (same name, .json suffix)."""
    return Path(out).with_suffix(".json")


# ---------------------------------------------------------------- evaluation


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, desc: str | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of `model` over the (x, y) batches of `loader`.

    The model is put in eval mode. `desc` shows a progress bar with that label.
    """
    model.eval()
    cl = _is_channels_last(model)
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, 0
    bar = _bar(total=_len_images(loader), desc=desc) if desc else None
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


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.15, start_div: float = 25.0,
                 end_div: float = 1e4) -> float:
    """One-cycle schedule: cosine rise from peak/start_div to peak over `warmup` of the steps, then cosine down.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    up = max(1, int(round(warmup * total)))
    if step < up:
        t = step / up
        lo = peak / start_div
        return lo + (peak - lo) * (1 - math.cos(math.pi * t)) / 2
    t = min(1.0, (step - up) / max(1, total - up))
    lo = peak / end_div
    return lo + (peak - lo) * (1 + math.cos(math.pi * t)) / 2


def train_teacher(source: str, data_cfg: DataConfig, epochs: float = 10.0, out: str | Path = "teacher.safetensors",
                  lr: float = 3e-3, seed: int = 0, max_train_images: int | None = None, *,
                  weight_decay: float = 0.05, label_smoothing: float = 0.1, drop_rate: float = 0.2,
                  drop_path_rate: float = 0.1, augment: bool = True, resume: bool = True,
                  checkpoint_minutes: float = 10.0, eval_each_epoch: bool = True,
                  init_from: str | Path | None = None, command: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a teacher from scratch on `data_cfg` and save it.

    Recipe: AdamW (decay on weights only), one-cycle LR peaking at `lr`, label smoothing,
    random crop (pad input_size/16) + horizontal flip, dropout/drop-path for timm models,
    channels_last, `data_cfg.batch_size`; `epochs` may be fractional. Trains on the train
    split only (the held-out split stays unseen), reports held-out top-1 after each epoch
    and test top-1 at the end. Writes `out` (safetensors) and `out` with a .json suffix
    (source, in_chans, num_classes, input_size, data, mean, std, test_top1, epochs,
    train_time_s, images_per_s, command, ...), and returns that dict. Progress is saved
    to `out`.partial.safetensors at each epoch end, every `checkpoint_minutes` and on
    Ctrl-C; a rerun with the same settings resumes from it. `init_from` starts from those
    weights instead of random ones (a second, gentler cycle on a teacher that was still
    improving). Raises HantError for bad
    arguments, data or model sources, or a partial file from other settings.
    """
    from hant.data import TensorImageDataset, load_data, make_loader, random_crop_flip
    from hant.workspace import save_safetensors, write_json

    out = Path(out).expanduser()
    if out.suffix == ".json":
        raise HantError(f"--out {out} must be the weights file (e.g. teacher.safetensors); the .json goes beside it")
    if not epochs > 0:
        raise HantError(f"--epochs must be positive, got {epochs}")
    if not lr > 0:
        raise HantError(f"--lr must be positive, got {lr}")
    for flag, value, high in (("--weight-decay", weight_decay, float("inf")), ("--label-smoothing", label_smoothing, 1.0),
                              ("--drop-rate", drop_rate, 1.0), ("--drop-path-rate", drop_path_rate, 1.0)):
        if not 0.0 <= value < high:
            raise HantError(f"{flag} must be in [0, {high:g}), got {value}")
    log = log or _tqdm_write
    cmd = command if command is not None else _command_line()

    splits = load_data(data_cfg)
    train = splits.train
    if max_train_images is not None:
        if max_train_images < 2:
            raise HantError(f"--max-images must be at least 2, got {max_train_images}")
        if max_train_images < len(train):
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:max_train_images]
            train = train.subset(pick.sort().values) if hasattr(train, "subset") else torch.utils.data.Subset(
                train, pick.sort().values.tolist())
    n_train = len(train)
    if n_train < 2:
        raise HantError(f"the train split has {n_train} image(s); use more data")
    batch = max(2, min(data_cfg.batch_size, n_train))  # BatchNorm needs 2 per batch
    steps_per_epoch = n_train // batch
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    torch.manual_seed(seed)
    timm_kwargs = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate} if parse_source(source)[0] == "timm" else {}
    try:
        model = _create(source, splits.in_chans, splits.num_classes, timm_kwargs)
    except TypeError:  # a timm family without drop path
        model = _create(source, splits.in_chans, splits.num_classes, {"drop_rate": drop_rate})
    init_sha = None
    if init_from is not None:
        from hant.workspace import sha256_file

        if not Path(init_from).is_file():
            raise HantError(f"--init-from {init_from} not found; pass an existing weights file")
        load_checkpoint(model, init_from)
        init_sha = sha256_file(init_from)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    signature = {"source": source, "data": splits.spec, "input_size": splits.input_size, "in_chans": splits.in_chans,
                 "num_classes": splits.num_classes, "heldout": len(splits.heldout), "seed": seed,
                 "data_seed": data_cfg.seed, "epochs": float(epochs), "lr": lr, "batch_size": batch,
                 "train_images": n_train, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
                 "drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "augment": augment}
    if init_sha is not None:
        signature["init_from_sha256"] = init_sha
    partial = out.with_suffix(".partial.safetensors")
    state = {"step": 0, "elapsed_s": 0.0, "history": []}
    if resume and partial.exists():
        state = _load_partial(partial, model, opt, signature)
        log(f"resuming from {partial} at step {state['step']}/{total_steps}")

    pad = max(1, splits.input_size // 16)
    fill = [-m / s for m, s in zip(splits.mean, splits.std)]  # black, after normalisation
    step = state["step"]
    elapsed = state["elapsed_s"]
    history = state["history"]
    bar = _bar(total=total_steps * batch, desc="train-teacher")
    bar.update(step * batch)
    t_start = time.perf_counter()
    last_ckpt = t_start

    def save_partial() -> None:
        _save_partial(partial, model, opt, signature,
                      {"step": step, "elapsed_s": elapsed + time.perf_counter() - t_start, "history": history})

    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            skip = step - epoch * steps_per_epoch
            model.train()
            loss_sum = correct = seen = 0
            for x, y in _epoch_batches(train, batch, seed + epoch, skip, make_loader, TensorImageDataset):
                if step >= total_steps:
                    break
                gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
                torch.manual_seed(seed * 1_000_003 + step)  # dropout/drop-path: reproducible on resume
                if augment:
                    x = random_crop_flip(x, pad, gen, fill=fill)
                x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = one_cycle_lr(step, total_steps, lr)
                out_logits = model(x)
                loss = F.cross_entropy(out_logits, y, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise HantError(f"training diverged (loss {float(loss)}) at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out_logits.argmax(1) == y).sum())
                seen += len(y)
                bar.update(len(y))
                bar.set_postfix(epoch=f"{epoch + 1}/{n_epochs}", loss=f"{loss_sum / seen:.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
                if checkpoint_minutes and time.perf_counter() - last_ckpt > 60 * checkpoint_minutes:
                    save_partial()
                    last_ckpt = time.perf_counter()
            record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen),
                      "train_top1": 100.0 * correct / max(1, seen)}
            if eval_each_epoch and len(splits.heldout) > 0:
                t_eval = time.perf_counter()
                record["heldout_top1"] = evaluate(model, make_loader(splits.heldout, 256))["top1"]
                t_start += time.perf_counter() - t_eval  # evaluation is not training time
            history.append(record)
            log(f"epoch {epoch + 1}/{n_epochs}: train loss {record['train_loss']:.4f}, "
                f"train top-1 {record['train_top1']:.2f}%"
                + (f", held-out top-1 {record['heldout_top1']:.2f}%" if "heldout_top1" in record else ""))
            if step < total_steps:
                save_partial()
                last_ckpt = time.perf_counter()
    except KeyboardInterrupt:
        bar.close()
        save_partial()
        log(f"saved progress to {partial}; rerun the same command to resume")
        raise
    bar.close()
    train_time = elapsed + time.perf_counter() - t_start
    images_seen = total_steps * batch

    test = evaluate(model, make_loader(splits.test, 256), desc="test")
    heldout = evaluate(model, make_loader(splits.heldout, 256)) if len(splits.heldout) else None
    meta = {
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
        "init_from": {"file": str(init_from), "sha256": init_sha} if init_from is not None else None,
        "epochs": epochs,
        "steps": total_steps,
        "batch_size": batch,
        "train_images": n_train,
        "lr": lr,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "drop_rate": drop_rate if timm_kwargs else 0.0,
        "drop_path_rate": drop_path_rate if timm_kwargs else 0.0,
        "augment": augment,
        "seed": seed,
        "train_time_s": round(train_time, 2),
        "images_per_s": round(images_seen / max(train_time, 1e-9), 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": cmd,
        "history": history,
    }
    sha = save_safetensors(out, model.state_dict(), metadata={"source": source, "in_chans": str(splits.in_chans),
                                                               "num_classes": str(splits.num_classes),
                                                               "input_size": str(splits.input_size)})
    meta["sha256"] = sha
    write_json(teacher_meta_path(out), meta)
    partial.unlink(missing_ok=True)
    return meta


def _epoch_batches(train, batch: int, seed: int, skip: int, make_loader, tensor_cls) -> Iterator:
    if isinstance(train, tensor_cls):
        it = train.batches(batch, shuffle=True, seed=seed, drop_last=True)
    else:
        it = iter(make_loader(train, batch, shuffle=True, seed=seed, drop_last=True))
    for i, b in enumerate(it):
        if i >= skip:
            yield b


def _save_partial(path: Path, model: nn.Module, opt: torch.optim.Optimizer, signature: dict, state: dict) -> None:
    from hant.workspace import save_safetensors

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    meta = {"version": PARTIAL_VERSION, "signature": signature, **state}
    save_safetensors(path, tensors, metadata={"hant_partial": json.dumps(meta)})


def _load_partial(path: Path, model: nn.Module, opt: torch.optim.Optimizer, signature: dict) -> dict:
    from safetensors import safe_open

    from hant.workspace import load_safetensors

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
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd)
    ostate: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            ostate.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": ostate, "param_groups": opt.state_dict()["param_groups"]})
    return {"step": int(meta["step"]), "elapsed_s": float(meta["elapsed_s"]), "history": list(meta["history"])}


def _tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("hant", "__main__.py", "cli.py"):
        argv[0] = "hant"
    return shlex.join(argv)
