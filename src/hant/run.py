"""`hant init`: create a run folder — the resolved configuration and the layers to replace.

Writes RUN/config.yaml (every later stage reads it) and RUN/layers.json: per layer its
shapes, stride, parameters, FLOPs and candidate pool, plus the layers that were skipped
and why. Initialising an existing run with the same configuration changes nothing;
with another configuration it is refused, so finished work is never silently mixed
with a different teacher, dataset or space.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from hant.config import RunConfig
from hant.errors import HantError

__all__ = ["init_run", "LAYERS_VERSION"]

LAYERS_VERSION = 1


def _resolve_path(p: str | None) -> str | None:
    # Stored absolute, so that later stages find it whatever their working directory.
    return str(Path(p).expanduser().resolve()) if p else p


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


def _build_config(model, checkpoint, data, data_dir, input_size, space, include, exclude, trust_pickle,
                  random_teacher, config) -> RunConfig:
    cfg = RunConfig.load(config) if config is not None else RunConfig()
    cfg = copy.deepcopy(cfg)
    if model is not None:
        cfg.model.source = model
    if checkpoint is not None:
        cfg.model.checkpoint = checkpoint
    if trust_pickle:
        cfg.model.trust_pickle = True
    if random_teacher:
        cfg.model.random_init = True
    if data is not None:
        cfg.data.spec = data
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    if input_size is not None:
        cfg.data.input_size = int(input_size)
    if space is not None:
        cfg.space = space
    if include:
        cfg.layers.include = list(include)
    if exclude:
        cfg.layers.exclude = list(exclude)
    cfg.model.checkpoint = _resolve_path(cfg.model.checkpoint)
    cfg.data.data_dir = _resolve_path(cfg.data.data_dir)
    # A space given as a file is stored by absolute path; a built-in space by name.
    if cfg.space and Path(cfg.space).suffix in (".yaml", ".yml"):
        cfg.space = _resolve_path(cfg.space)
    return cfg


RANDOM_TEACHER_FILE = "teacher.safetensors"


def _random_teacher_checkpoint(rd, cfg: RunConfig, in_chans: int, num_classes: int, log) -> None:
    """Make sure a run whose teacher has no trained weights has seeded ones on disk.

    Without weights, every process would initialise the network afresh, so phase 1,
    scores and fine-tuning (and every torchrun rank) would each see another teacher.
    The first `init` seeds the network with `cfg.seed` and saves it into the run folder;
    later calls reuse that file, whose sha256 every stage then checks like any checkpoint.
    """
    import torch

    from hant.teacher import create_model
    from hant.workspace import save_safetensors

    path = rd.root / RANDOM_TEACHER_FILE
    if path.is_file():
        return
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.source, in_chans, num_classes)
    finally:
        torch.random.set_rng_state(state)
    rd.root.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    log(f"{rd.root}: {cfg.model.source} has no trained weights; seeded it (seed {cfg.seed}) and saved {path}")


def _checkpoint_sha(path: str | None) -> str | None:
    from hant.workspace import sha256_file

    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise HantError(f"teacher checkpoint {path} not found; pass an existing file with --checkpoint")
    return sha256_file(p)


def init_run(
    run: str | Path,
    model: str | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    input_size: int | None = None,
    space: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    trust_pickle: bool = False,
    config: str | Path | None = None,
    random_teacher: bool = False,
    log=print,
) -> RunConfig:
    """Create (or confirm) the run folder `run` and return its resolved RunConfig.

    Arguments that are None (or empty) take their value from the YAML file `config`
    when given, else the RunConfig defaults. Loads the data (to record its channels,
    classes, mean and std), loads the teacher (so a bad checkpoint fails here), finds
    the replaceable layers, and computes each layer's candidate pool from the space.
    Writes RUN/config.yaml and RUN/layers.json
    (`{"version", "model", "checkpoint_sha256", "input_size", "space", "layers":
    [LayerInfo fields + "candidates"], "skipped": [{"name", "reason"}]}`).

    A teacher needs weights: `checkpoint`, or `random_teacher=True` (CLI `--random-teacher`),
    which seeds the network with the run's seed and saves it as RUN/teacher.safetensors, the
    run's checkpoint from then on, so every stage and process sees the same teacher.

    Raises HantError when the run already holds another configuration, when the teacher has
    no weights and `random_teacher` is not set, or for any problem with the model,
    checkpoint, data, space or layer globs.
    """
    from hant.data import load_data
    from hant.layers import discover_layers
    from hant.space import load_space
    from hant.teacher import load_teacher
    from hant.workspace import RunDir, read_yaml, run_lock, write_json

    rd = RunDir(run)
    cfg = _build_config(model, checkpoint, data, data_dir, input_size, space, include, exclude, trust_pickle,
                        random_teacher, config)
    seeded = str((rd.root / RANDOM_TEACHER_FILE).expanduser().resolve())
    if cfg.model.random_init and cfg.model.checkpoint is None:
        cfg.model.checkpoint = seeded
    elif cfg.model.random_init and cfg.model.checkpoint != seeded:
        raise HantError("--random-teacher seeds a teacher without weights; drop it, or drop --checkpoint")
    elif cfg.model.checkpoint is None:
        raise HantError(f"{cfg.model.source} is named without weights: pass --checkpoint FILE with the trained "
                        "teacher, or --random-teacher to seed an untrained one and save it in the run folder "
                        "(every stage then uses those same weights)")
    space_obj = load_space(cfg.space)  # fail on a bad space before loading anything heavy
    splits = load_data(cfg.data)
    cfg.data = splits.record(cfg.data)
    new = cfg.to_dict()

    if rd.config.exists():
        try:
            # Through the dataclasses, so a key that a newer hant added with its default
            # does not count as a difference.
            old = RunConfig.load(rd.config).to_dict()
        except HantError:
            old_raw = read_yaml(rd.config) or {}
            old = {k: v for k, v in old_raw.items() if k != "version"} if isinstance(old_raw, dict) else {}
        diff = _first_difference(old, new)
        if diff is not None:
            raise HantError(f"{rd.root} is already initialised with another configuration ({diff}); "
                            "use a new --run folder, or delete this one to start over")
        if rd.layers.exists():
            return RunConfig.load(rd.config)

    if cfg.model.random_init:
        with run_lock(rd.root, log=log):
            _random_teacher_checkpoint(rd, cfg, splits.in_chans, splits.num_classes, log)
    sha = _checkpoint_sha(cfg.model.checkpoint)
    teacher = load_teacher(cfg.model.source, splits.in_chans, splits.num_classes, cfg.model.checkpoint,
                           cfg.model.trust_pickle)
    shape = (splits.in_chans, splits.input_size, splits.input_size)
    layers, skipped = discover_layers(teacher, shape, include=cfg.layers.include, exclude=cfg.layers.exclude)
    if not layers:
        raise HantError(f"{cfg.model.source} has no replaceable layers with these --include/--exclude globs; "
                        "list them with `hant inspect`")
    entries = []
    for info in layers:
        d = info.to_dict()
        d["candidates"] = space_obj.candidates(info.in_chs, info.out_chs, info.stride)
        entries.append(d)
    doc = {
        "version": LAYERS_VERSION,
        "model": cfg.model.source,
        "checkpoint_sha256": sha,
        "input_size": list(shape),
        "space": cfg.space,
        "layers": entries,
        "skipped": [dict(s) for s in skipped],
    }
    with run_lock(rd.root, log=log):
        cfg.save(rd.config)
        write_json(rd.layers, doc)
    n = sum(len(e["candidates"]) for e in entries)
    log(f"{rd.root}: {len(entries)} layers, {n} candidates ({cfg.space}); {len(skipped)} modules skipped")
    return cfg
