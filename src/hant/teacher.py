"""Teachers: build one from a source string and load its weights.

A source names a network factory:

    timm:NAME                  any timm model (pretrained=False: nothing is downloaded)
    torchvision:NAME           any torchvision classification model (first conv adapted to in_chans)
    package.module:factory     a callable returning an nn.Module, given in_chans/num_classes if it takes them
    memory:KEY                 a live nn.Module registered by `hant.accelerate` in this process
                               (an architecture no source string can rebuild)

Weights come from safetensors, or from a torch checkpoint read with `weights_only=True`;
a file that needs unpickling is refused unless the caller trusts it. Training a teacher
is `hant.teacher_train`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from hant.errors import HantError

SOURCE_FORMS = "timm:NAME, torchvision:NAME or package.module:factory"
_IN_CHANS_NAMES = ("in_chans", "in_channels", "in_chs")
# Wrappers other training scripts put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
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


def create_model(source: str, in_chans: int, num_classes: int, *, timm_kwargs: dict | None = None) -> nn.Module:
    """Build an untrained network from `source` for `in_chans` input channels and `num_classes` outputs.

    `timm_kwargs` (e.g. drop_rate) go to a timm model's constructor; other sources ignore them.
    Raises HantError for an unknown name (with close matches) or a factory that cannot be imported.
    """
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


# Moved to hant.teacher_train; still importable from here for callers not yet switched.
_MOVED = ("evaluate", "one_cycle_lr", "teacher_meta_path", "train_teacher")


def __getattr__(name: str):
    if name in _MOVED:
        from hant import teacher_train

        return getattr(teacher_train, name)
    raise AttributeError(f"module 'hant.teacher' has no attribute {name!r}")
