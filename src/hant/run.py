"""The run folder: `hant init` creates it, and `Run` is its one reader.

`init_run` resolves the configuration and finds the layers to replace.

Writes RUN/config.yaml (every later stage reads it) and RUN/layers.json: per layer its
shapes, stride, parameters, FLOPs and candidate pool, plus the layers that were skipped
and why. Initialising an existing run with the same configuration changes nothing;
with another configuration it is refused, so finished work is never silently mixed
with a different teacher, dataset or space.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hant.config import RunConfig
from hant.errors import HantError

__all__ = ["init_run", "Run", "LAYERS_VERSION", "TEACHER_SPEC"]

LAYERS_VERSION = 1
TEACHER_SPEC = "teacher"  # a plan's spec for a layer it keeps: the teacher's own, its weights untouched


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


def _check_teacher_split(cfg: RunConfig, splits) -> None:
    """Refuse a run whose held-out images the teacher may have trained on.

    `hant train-teacher` writes F.json beside its checkpoint F with the dataset, the split's
    seed and the number of images it held out. The run holds out the first `n` of the same
    seeded permutation, so with the same dataset and seed, and `n` no more than the
    teacher's, its held-out images are among those the teacher never saw.
    """
    if not cfg.model.checkpoint or splits.spec.startswith("tensors:"):
        return  # a tensors file names its held-out images itself
    info = Path(cfg.model.checkpoint).expanduser().with_suffix(".json")
    try:
        t = json.loads(info.read_text())
    except (OSError, ValueError):
        return  # not a teacher hant trained: nothing recorded to compare
    if not isinstance(t, dict) or t.get("data") != splits.spec or "data_seed" not in t or "heldout" not in t:
        return
    n = len(splits.heldout)
    if t["data_seed"] != cfg.data.seed or int(t["heldout"]) < n:
        raise HantError(
            f"the teacher {cfg.model.checkpoint} was trained on {splits.spec} holding out {t['heldout']} images "
            f"with data seed {t['data_seed']}, and this run holds out {n} with seed {cfg.data.seed}, some of which "
            f"the teacher trained on; set data.seed: {t['data_seed']} and data.heldout of at most {t['heldout']} "
            f"in --config, or train the teacher with --data-seed {cfg.data.seed} --heldout {n}")


def _checkpoint_sha(path: str | None) -> str | None:
    from hant.workspace import sha256_file

    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise HantError(f"teacher checkpoint {path} not found; pass an existing file with --checkpoint")
    return sha256_file(p)


def _resolve_teacher_weights(cfg: RunConfig, rd) -> None:
    """Point `cfg.model.checkpoint` at the run's seeded teacher under --random-teacher; raise
    HantError when the teacher has no weights, or has a checkpoint besides --random-teacher."""
    seeded = str((rd.root / RANDOM_TEACHER_FILE).expanduser().resolve())
    if cfg.model.random_init and cfg.model.checkpoint is None:
        cfg.model.checkpoint = seeded
    elif cfg.model.random_init and cfg.model.checkpoint != seeded:
        raise HantError("--random-teacher seeds a teacher without weights; drop it, or drop --checkpoint")
    elif cfg.model.checkpoint is None:
        raise HantError(f"{cfg.model.source} is named without weights: pass --checkpoint FILE with the trained "
                        "teacher, or --random-teacher to seed an untrained one and save it in the run folder "
                        "(every stage then uses those same weights)")


def _refuse_another_config(rd, new: dict[str, Any]) -> None:
    """Raise HantError naming the first difference when RUN/config.yaml holds a configuration
    other than `new` (a dict of `RunConfig.to_dict`)."""
    from hant.workspace import read_yaml

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
    from hant.workspace import RunDir, run_lock, write_json

    rd = RunDir(run)
    cfg = _build_config(model, checkpoint, data, data_dir, input_size, space, include, exclude, trust_pickle,
                        random_teacher, config)
    _resolve_teacher_weights(cfg, rd)
    space_obj = load_space(cfg.space)  # fail on a bad space before loading anything heavy
    splits = load_data(cfg.data)
    cfg.data = splits.record(cfg.data)
    _check_teacher_split(cfg, splits)
    new = cfg.to_dict()

    if rd.config.exists():
        _refuse_another_config(rd, new)
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
    entries = [{**info.to_dict(), "candidates": space_obj.candidates(info.in_chs, info.out_chs, info.stride,
                                                                      teacher.get_submodule(info.name))}
               for info in layers]
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


class Run:
    """A run folder as the stages read it: its configuration, layers, teacher, phase-1
    candidates, scores, latency tables and plans, each checked once, here.

    `Run(path)` reads nothing yet; each property reads its file on first use and raises
    HantError naming the stage to run when the file is missing. Paths are in `run.dir`
    (a `hant.workspace.RunDir`); writing stays with the stages, through those paths and
    `hant.workspace`'s atomic writers.
    """

    def __init__(self, root: str | Path):
        from hant.workspace import RunDir

        self.dir = RunDir(root)
        self._config: RunConfig | None = None
        self._layers_doc: dict[str, Any] | None = None
        self._teacher_checked = False

    @property
    def root(self) -> Path:
        return self.dir.root

    @property
    def config(self) -> RunConfig:
        """RUN/config.yaml as a RunConfig."""
        if self._config is None:
            self._config = RunConfig.load(self.dir.require(self.dir.config, "init"))
        return self._config

    @property
    def layers_doc(self) -> dict[str, Any]:
        """RUN/layers.json as written by `init_run` (a bare list from older runs is wrapped)."""
        if self._layers_doc is None:
            from hant.workspace import read_json

            doc = read_json(self.dir.require(self.dir.layers, "init"))
            self._layers_doc = doc if isinstance(doc, dict) else {"layers": doc}
        return self._layers_doc

    @property
    def layers(self) -> list:
        """The replaceable layers, in network order, as `hant.layers.LayerInfo`."""
        from hant.layers import LayerInfo

        raw = self.layers_doc.get("layers") or []
        if not raw:
            raise HantError(f"{self.dir.layers} lists no layers; re-create the run with `hant init`")
        return [LayerInfo.from_dict(d) for d in raw]

    @property
    def pools(self) -> dict[str, list[str]]:
        """{layer name: candidate specs} as `init` recorded them."""
        return {d["name"]: list(d.get("candidates") or ["teacher"]) for d in self.layers_doc.get("layers") or []}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        size = self.layers_doc.get("input_size")
        if size:
            return tuple(int(v) for v in size)
        c = self.config
        return int(c.data.in_chans or 1), int(c.data.input_size), int(c.data.input_size)

    def check_teacher(self) -> None:
        """Raise HantError when the teacher checkpoint is missing or is not the one `init` saw.

        Every stage that learns from or compares with the teacher must see the weights
        phase 1 learnt from; a student mixing two teachers would be silently wrong.
        """
        if self._teacher_checked:
            return
        from hant.workspace import sha256_file

        want = self.layers_doc.get("checkpoint_sha256")
        ckpt = self.config.model.checkpoint
        if ckpt and not Path(ckpt).is_file():
            raise HantError(f"teacher checkpoint {ckpt} is missing; put it back, or initialise a new run folder")
        if want and ckpt and sha256_file(ckpt) != want:
            raise HantError(f"teacher checkpoint {ckpt} changed since `hant init`; "
                            "initialise a new run folder for the new teacher")
        self._teacher_checked = True

    def teacher(self):
        """A fresh copy of the teacher in eval mode, its checkpoint checked against `init`'s sha256."""
        from hant.teacher import load_teacher

        self.check_teacher()
        c = self.config
        return load_teacher(c.model.source, c.data.in_chans, c.data.num_classes, c.model.checkpoint,
                            c.model.trust_pickle)

    def candidate_index(self) -> dict[tuple[str, str], dict[str, Any]]:
        """{(layer, spec): entry} of RUN/candidates/index.json; empty before phase 1."""
        from hant.workspace import read_json

        if not self.dir.candidates_index.exists():
            return {}
        return {(e["layer"], e["spec"]): e for e in read_json(self.dir.candidates_index).get("candidates", [])}

    def candidate(self, layer: str, spec: str, index: dict | None = None) -> dict:
        """The phase-1 weights of `spec` on `layer`, checked against their recorded sha256.

        `index` (from `candidate_index`) saves re-reading the index for many candidates.
        Raises HantError when the candidate has no finished phase-1 weights.
        """
        from hant.workspace import load_safetensors

        entry = (index if index is not None else self.candidate_index()).get((layer, spec))
        if entry is None or not entry.get("file"):
            raise HantError(f"candidate {spec} of layer {layer} has no phase-1 weights; "
                            f"run `hant distill --run {self.root}`")
        status = entry.get("status")
        if status is not None and status != "done":
            raise HantError(f"candidate {spec} of layer {layer} is '{status}' in phase 1; "
                            f"run `hant distill --run {self.root}` to finish it")
        f = Path(entry["file"])
        if not f.is_absolute():
            # Recorded relative to the run folder; older layouts recorded it relative to candidates/.
            f = self.root / f if (self.root / f).exists() else self.dir.candidates_dir / f
        return load_safetensors(f, entry.get("sha256"))

    def scores(self, context: str | None = None) -> dict[str, Any]:
        """RUN/scores.json; with `context`, the scores in that plan's context
        (RUN/refine/<plan>.scores.json, `hant score --plan`), complete and of the plan as it is now."""
        from hant.workspace import read_json

        if context is None:
            return read_json(self.dir.require(self.dir.scores, "score"))
        path = self.dir.context_scores(context)
        doc = read_json(path) if path.exists() else {}
        if not doc.get("complete") or (doc.get("plan") or {}).get("layers") != self.plan(context)["layers"]:
            raise HantError(f"plan {context} has no complete scores in its context; run "
                            f"`hant score --run {self.root} --plan {context}` first")
        return doc

    def table(self, target: str, batch_size: int | None = None) -> dict[str, Any]:
        """A complete latency table (see `hant.latency.load_table` for how `target` resolves)."""
        from hant.latency.model import load_table

        return load_table(self.root, target, batch_size)

    def plan(self, name: str) -> dict[str, Any]:
        """RUN/plans/<name>.json, with its "layers" checked to map layer names to specs.

        Raises HantError naming the run's plans when there is none of that name.
        """
        from hant.workspace import read_json

        path = self.dir.plan(name)
        if not path.exists():
            folder = self.root / "plans"
            have = sorted(p.stem for p in folder.glob("*.json") if not p.stem.endswith(".pick")) if folder.is_dir() else []
            raise HantError(f"no plan '{name}' in {folder}; "
                            + (f"plans: {', '.join(have)}" if have else "run `hant select` first"))
        plan = read_json(path)
        plan.setdefault("name", name)
        layers = plan.get("layers")
        if not isinstance(layers, dict) or not all(isinstance(v, str) for v in layers.values()):
            raise HantError("the plan's \"layers\" must map layer names to spec strings; re-run `hant select`")
        return plan

    def redistilled_index(self, plan: str, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """RUN/redistilled/<plan>/index.json, or None when there is none or it is unreadable (a torn
        or foreign file: `log` hears so, and its layers count as not re-distilled)."""
        from hant.workspace import read_json

        path = self.dir.redistilled_index(plan)
        if not path.exists():
            return None
        try:
            doc = read_json(path)
        except HantError:
            if log:
                log(f"redistill: {path} is unreadable; its layers count as not re-distilled")
            return None
        return doc if isinstance(doc, dict) else None

    def redistilled(self, plan: str, layers_arch: Mapping[str, Mapping[str, Any]],
                    log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]] | None:
        """The re-distilled weights of a plan (`hant.redistill`), {layer: state dict}, or None when
        there are none to use.

        `layers_arch` is the plan's arch "layers" ({layer: {"spec", ...}}, canonical specs). The
        weights are used only when the plan's index is complete, lists exactly the plan's
        replaced layers with their specs, and each layer's phase-1 weights are still those it
        started from; otherwise None (and `log` hears why, when an index exists). Raises
        HantError when a listed file is missing or does not match its recorded sha256.
        """
        from hant.workspace import load_safetensors

        doc = self.redistilled_index(plan, log)
        if doc is None:
            return None
        redo = f"run `hant redistill --run {self.root} --plan {plan}` to redo it"
        want = {name: e["spec"] for name, e in layers_arch.items() if e["spec"] != TEACHER_SPEC}
        if not doc.get("complete") or doc.get("layers") != want:
            if log:
                log(f"redistill: the re-distillation of plan {plan} is unfinished or was made for other layers; "
                    f"using phase-1 weights ({redo})")
            return None
        phase1 = self.candidate_index()
        states = {}
        for e in doc.get("entries") or []:
            if (phase1.get((e["layer"], e["spec"])) or {}).get("sha256") != e.get("phase1_sha256"):
                if log:
                    log(f"redistill: phase 1 has retrained {e['spec']} of layer {e['layer']} since plan {plan} was "
                        f"re-distilled; using phase-1 weights ({redo})")
                return None
            try:
                states[e["layer"]] = load_safetensors(self.root / e["file"], e.get("sha256"))
            except HantError:
                raise HantError(f"re-distilled weights {self.root / e['file']} of plan {plan} are missing, truncated "
                                f"or altered; {redo}, or assemble with redistilled=False") from None
        return states
