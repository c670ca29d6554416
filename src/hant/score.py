"""Per-candidate scores: how much the teacher's held-out loss changes when one layer is replaced.

For every trained candidate o of layer l, the teacher with l alone replaced by o is run over
the held-out split (never seen by phase 1 or fine-tuning), and RUN/scores.json records

    d_loss   mean cross-entropy against the labels, candidate minus teacher
    d_acc    top-1 accuracy, candidate minus teacher, in percentage points
    kl       mean KL(teacher || candidate) of the output distributions

plus the candidate's parameters and FLOPs per image (so that selection needs no torch). The
`teacher` candidate scores exactly zero without a pass.

Cost: the teacher runs once over the held-out split for its logits. Then, per layer and
chunk of candidates, each batch's input to the layer is computed by the prefix alone (a
pre-hook stops the forward there), and each candidate runs only itself and the rest of the
network (`Suffix`). Partial results are written after every chunk, and a restart skips
candidates already scored with the same weights, method and images.

`method="distill"` instead takes each candidate's held-out normalised MSE from phase 1 as
d_loss (d_acc and kl null): no passes over the data, for very large pools.

In a plan's context (`plan=`, `hant score --plan P`, written to RUN/refine/<plan>.scores.json):
the same scores with the plan's student (phase-1 weights, as its candidates were scored) in
place of the teacher, so every layer's candidates, the teacher's own layer among them, are
scored against the plan's loss with the rest of the plan in place. Replace-one-layer scores
taken around the teacher add up badly once many layers are replaced (on the RegNetX-200MF
families run, five stacked layers each cost under 0.003 nats alone and 0.37 together,
bench/results/additivity.json); scores around the plan see the plan's other replacements.
"plan" records its layers and its own held-out loss against the teacher's (`d_loss`,
`d_acc`, `kl`), so that the loss of a plan chosen from these scores is predicted as the
plan's plus their sum. `hant refine` (`hant.pipeline.refine_plan`) alternates this with
selection.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hant.errors import HantError

if TYPE_CHECKING:
    from hant.layers import LayerInfo

__all__ = ["Suffix", "layer_input", "replacement_scores", "count_flops", "score", "plan_heldout", "METHODS"]

METHODS = ("eval", "distill")
_CHUNK = 16  # candidates evaluated per pass over the held-out split; also the checkpoint interval
_CACHE_BYTES = 1 << 30  # held-out batches are kept in memory below this size


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once the wanted input is captured."""


@torch.no_grad()
def layer_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of layer `name` when `model` runs on `x`, computing only what comes before it.

    Raises HantError when the forward never reaches the layer.
    """
    from hant.layers import get_layer

    box: list[torch.Tensor] = []

    def grab(module, args):
        box.append(args[0])
        raise _Stop

    handle = get_layer(model, name).register_forward_pre_hook(grab)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise HantError(f"the model's forward never calls layer {name}; re-create layers.json with `hant init`")
    return box[0]


class _PassThrough(nn.Module):
    """Stands in for a module that runs before the replaced layer: returns its input unchanged."""

    def forward(self, x, *args, **kwargs):
        return x


class _Inject(nn.Module):
    """Stands in for the replaced layer: returns a precomputed output, ignoring its input."""

    def __init__(self):
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.out


class Suffix:
    """Runs a network from one layer onwards: the candidate's output in, logits out.

    Every module that runs before the layer (at each level of the layer's ancestry) is swapped
    for a pass-through and the layer for the candidate's output, so a forward costs only the
    layer's successors: for timm EfficientNet, the later blocks and the head. This is checked
    once against the full model (the teacher's own layer must give the teacher's logits); when
    it does not hold (a skip connection around the layer, functional code that needs the
    prefix's values), `mode` is `full` and each call runs the whole network with the candidate
    in place, which is always right, only slower.
    """

    def __init__(self, model: nn.Module, name: str, example: torch.Tensor, reference: torch.Tensor | None = None):
        """`example`: an input batch for the check; `reference`: the model's output on it, if known."""
        from hant.layers import get_layer

        self.model, self.name = model, name
        self.layer = get_layer(model, name)
        self._inject = _Inject()
        self._swaps, x_layer = self._prefix_modules(example)
        self.mode = "suffix"
        with torch.no_grad():
            want = model(example) if reference is None else reference
            try:
                got = self._run_suffix(example, self.layer(x_layer))
                ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4,
                                                                atol=1e-5 * float(want.abs().max()) + 1e-6)
            except Exception:  # any failure of the shortcut means: use the full forward
                ok = False
        if not ok:
            self.mode = "full"

    def _prefix_modules(self, example: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Names of the modules that run before the layer, at every level of its ancestry;
        and the layer's input for `example`."""
        order: dict[str, int] = {}
        handles = []
        for n, m in self.model.named_modules():
            if n:
                def pre(module, args, n=n):
                    order.setdefault(n, len(order))
                handles.append(m.register_forward_pre_hook(pre))
        try:
            x_layer = layer_input(self.model, self.name, example)
        finally:
            for h in handles:
                h.remove()
        parts = self.name.split(".")
        swaps = []
        for depth in range(len(parts)):
            parent = ".".join(parts[:depth])
            on_path = ".".join(parts[:depth + 1])
            container = self.model.get_submodule(parent) if parent else self.model
            for child, _ in container.named_children():
                full = f"{parent}.{child}" if parent else child
                if full != on_path and order.get(full, math.inf) < order.get(on_path, -1):
                    swaps.append(full)
        return swaps, x_layer

    @contextlib.contextmanager
    def _swapped(self, replacements: dict[str, nn.Module]) -> Iterator[None]:
        """The model with `replacements` in place for the duration, its own modules after."""
        from hant.layers import get_layer, replace_layers

        saved = {n: get_layer(self.model, n) for n in replacements}
        replace_layers(self.model, replacements)
        try:
            yield
        finally:
            replace_layers(self.model, saved)

    def _run_suffix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._inject.out = y
        try:
            with self._swapped({**{n: _PassThrough() for n in self._swaps}, self.name: self._inject}):
                return self.model(x)
        finally:
            self._inject.out = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, x_layer: torch.Tensor, candidate: nn.Module) -> torch.Tensor:
        """Logits of the network with the layer replaced by `candidate`.

        x: the network's input batch; x_layer: the layer's input for that batch (`layer_input`).
        """
        if self.mode == "suffix":
            return self._run_suffix(x, candidate(x_layer))
        with self._swapped({self.name: candidate}):
            return self.model(x)


@torch.no_grad()
def replacement_scores(model: nn.Module, name: str, candidates: dict[str, nn.Module],
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       teacher_logits: Sequence[torch.Tensor] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float | None]]:
    """Scores of each candidate replacing layer `name` of `model` over the (x, labels) batches.

    Returns {spec: {"d_loss", "d_acc", "kl"}} (see the module docstring); a candidate whose
    output is not finite gets None values. `teacher_logits` (one tensor per batch) saves the
    teacher's own pass when given. `progress(n)` is called with the images done per candidate
    and batch.
    """
    model.eval()
    for m in candidates.values():
        m.eval()
    suffix = None
    sums = {s: [0.0, 0.0, 0.0] for s in candidates}  # loss, correct, kl
    t_loss = t_correct = 0.0
    n = 0
    for b, (x, y) in enumerate(batches):
        t_out = teacher_logits[b] if teacher_logits is not None else model(x)
        if suffix is None:
            suffix = Suffix(model, name, x, reference=t_out)
        t_logp = F.log_softmax(t_out.float(), dim=1)
        t_loss += float(F.nll_loss(t_logp, y, reduction="sum"))
        t_correct += float((t_out.argmax(1) == y).sum())
        x_layer = layer_input(model, name, x)
        for spec, cand in candidates.items():
            logp = F.log_softmax(suffix(x, x_layer, cand).float(), dim=1)
            acc = sums[spec]
            acc[0] += float(F.nll_loss(logp, y, reduction="sum"))
            acc[1] += float((logp.argmax(1) == y).sum())
            acc[2] += float(F.kl_div(logp, t_logp, log_target=True, reduction="sum"))
            if progress is not None:
                progress(len(y))
        n += len(y)
    if n == 0:
        raise HantError("the held-out split is empty; raise data.heldout in the run's config")
    out = {}
    for spec, (loss, correct, kl) in sums.items():
        vals = {"d_loss": (loss - t_loss) / n, "d_acc": 100.0 * (correct - t_correct) / n, "kl": kl / n}
        out[spec] = vals if all(math.isfinite(v) for v in vals.values()) else {k: None for k in vals}
    return out


@torch.no_grad()
def count_flops(module: nn.Module, in_shape: Sequence[int]) -> int:
    """FLOPs of one forward of `module` on one image of shape (C, H, W) (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(module.parameters(), None)
    x = torch.zeros((1, *in_shape), device=p.device if p is not None else "cpu")
    was = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            module(x)
    finally:
        module.train(was)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The stage


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, file=sys.stderr)


def _candidate_file(run: Path, entry: dict) -> Path:
    from hant.workspace import RunDir

    f = entry.get("file")
    if f:
        p = Path(f)
        return p if p.is_absolute() else run / p
    return RunDir(run).candidate_file(entry["layer"], entry["spec"])


def _build(layer, spec: str, teacher_layer: nn.Module) -> nn.Module:
    from hant.ops import build

    return build(spec, layer.in_chs, layer.out_chs, layer.stride, teacher_layer,
                 in_hw=tuple(layer.in_shape[1:]), out_hw=tuple(layer.out_shape[1:]))


def _load_candidate(run: Path, layer, entry: dict, teacher_layer: nn.Module) -> nn.Module:
    from hant.workspace import load_safetensors

    module = _build(layer, entry["spec"], teacher_layer)
    if not entry.get("file") and not module.state_dict():
        return module.eval()  # nothing to load (skip): phase 1 need not have written a file
    state = load_safetensors(_candidate_file(run, entry), entry.get("sha256"))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HantError(f"{entry['layer']}/{entry['spec']}: weights do not fit the op ({str(e).splitlines()[0]}); "
                        "rerun `hant distill`") from None
    return module.eval()


def _size(layer, module: nn.Module) -> dict[str, int]:
    return {"params": sum(p.numel() for p in module.parameters()), "flops": count_flops(module, layer.in_shape)}


def score(run: str | Path, method: str | None = None, plan: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every trained candidate of the run and write RUN/scores.json.

    method: `eval` (replace one layer, run the held-out split) or `distill` (phase-1 held-out
    NMSE as d_loss, no passes); None takes the run's config (`score.method`). `score.images`
    in the config caps the held-out images. Resumable: entries already scored with the same
    weights (sha256), method and image count are kept. With `plan`, the scores in that plan's
    context go to RUN/refine/<plan>.scores.json instead (method `eval` only; see the module
    docstring), with "plan" and "complete" besides.

    Returns the scores object written ({"version", "method", "images", "teacher", "entries"}).
    Raises HantError when earlier stages are missing or the method is unknown.
    """
    from hant.run import Run
    from hant.workspace import run_lock, write_json

    run = Path(run)
    the_run = Run(run)
    rd = the_run.dir
    cfg = the_run.config
    method = method or cfg.score.method
    if method not in METHODS:
        raise HantError(f"unknown score method {method!r}; use one of {', '.join(METHODS)}")
    if plan is not None and method != "eval":
        raise HantError("scores in a plan's context are loss changes on held-out images; use --method eval")
    context = the_run.plan(plan) if plan is not None else None
    layers = the_run.layers
    rd.require(rd.candidates_index, "distill")
    known = {d.name for d in layers}
    todo = [e for e in the_run.candidate_index().values()
            if e.get("status") == "done" and e.get("spec") != "teacher" and e.get("layer") in known]
    if not todo:
        raise HantError(f"{rd.candidates_index} has no trained candidates; run `hant distill --run {run}` first")

    path = rd.scores if context is None else rd.context_scores(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(run, log=log):
        t0 = time.perf_counter()
        if method == "distill":
            out = _score_distill(run, cfg, layers, todo, log)
        else:
            out = _score_eval(run, cfg, layers, todo, log, path, context)
        write_json(path, out)
        failed = [e for e in out["entries"] if e.get("status") == "failed"]
        where = "" if context is None else f" in the context of plan {plan}"
        log(f"scores: {len(out['entries']) - len(failed)} candidates{where} ({method}, {out.get('images') or 0} "
            f"held-out images) in {time.perf_counter() - t0:.0f} s -> {path}"
            + (f"; {len(failed)} failed (e.g. {failed[0]['layer']}/{failed[0]['spec']}: {failed[0]['reason']})"
               if failed else ""))
        unreadable = sum(1 for e in failed if e.get("unreadable"))
        if unreadable:
            log(f"scores: {unreadable} candidates have unreadable weights; `hant distill --run {run}` recomputes "
                "them, then rerun `hant score`")
    return out


def _teacher_entries(layers) -> list[dict]:
    return [{"layer": d.name, "spec": "teacher", "d_loss": 0.0, "d_acc": 0.0, "kl": 0.0,
             "params": d.params, "flops": d.flops, "status": "done"} for d in layers]


def _previous(path: Path, method: str, images: int | None, log,
              context: dict | None = None) -> dict[tuple[str, str], dict]:
    """Entries of an earlier, interrupted or finished, run of the same method and images (and,
    for scores in a plan's context, of the same plan)."""
    from hant.workspace import read_json

    if not path.exists():
        return {}
    try:
        old = read_json(path)
    except HantError:
        log(f"scores: {path} is unreadable (corrupt or truncated); scoring every candidate afresh")
        return {}
    if old.get("method") != method or old.get("images") != images:
        return {}
    if context is not None and (old.get("plan") or {}).get("layers") != context["layers"]:
        return {}
    return {(e["layer"], e["spec"]): e for e in old.get("entries", []) if context is not None or e.get("spec") != "teacher"}


def _score_distill(run: Path, cfg, layers, todo: list[dict], log) -> dict[str, Any]:
    from hant.workspace import RunDir

    by_name = {d.name: d for d in layers}
    prev = _previous(RunDir(run).scores, "distill", None, log)
    entries = _teacher_entries(layers)
    torch.manual_seed(cfg.seed)
    for e in todo:
        old = prev.get((e["layer"], e["spec"]))
        if old is not None and old.get("sha256") == e.get("sha256") and old.get("d_loss") == e.get("heldout_loss"):
            entries.append(old)
            continue
        layer = by_name[e["layer"]]
        loss = e.get("heldout_loss")
        row = {"layer": e["layer"], "spec": e["spec"], "d_loss": loss, "d_acc": None, "kl": None,
               **_size(layer, _build(layer, e["spec"], None)), "sha256": e.get("sha256"), "status": "done"}
        if loss is None or not math.isfinite(float(loss)):
            row.update(d_loss=None, status="failed", reason="no finite held-out loss from phase 1")
        entries.append(row)
    return {"version": 1, "method": "distill", "images": None, "entries": entries}


def _heldout_batches(cfg, every_image: bool = False) -> tuple[list | Any, int]:
    """The held-out (x, y) batches (the first `score.images` of them unless `every_image`),
    kept in memory when small; and the number of images."""
    from hant.data import load_data, make_loader

    held = load_data(cfg.data).heldout
    n = len(held) if cfg.score.images is None or every_image else min(len(held), int(cfg.score.images))
    if n == 0:
        raise HantError("the held-out split is empty; raise data.heldout in the run's config")
    if n < len(held):
        held = held.subset(torch.arange(n)) if hasattr(held, "subset") else torch.utils.data.Subset(held, range(n))
    loader = make_loader(held, batch_size=cfg.data.batch_size)
    x0, _ = next(iter(loader))
    if x0[0].numel() * 4 * n <= _CACHE_BYTES:
        return list(loader), n
    return loader, n


@torch.no_grad()
def plan_heldout(run: str | Path, layers: dict[str, str], every_image: bool = False) -> dict[str, float]:
    """A plan's student (phase-1 weights, as in scoring) against the teacher on the scored
    held-out images (`every_image`: the whole held-out split): {"loss", "top1", "d_loss",
    "d_acc", "kl", "images"}, changes from the teacher's."""
    from hant.run import Run
    from hant.student import assemble

    run = Path(run)
    cfg = Run(run).config
    batches, n_images = _heldout_batches(cfg, every_image)
    fmt = torch.channels_last
    teacher = Run(run).teacher().to(memory_format=fmt).eval()
    student = assemble(run, {"layers": layers}, bn_recalibrate=False, redistilled=False).to(memory_format=fmt).eval()
    t_logits, s_logits = [], []
    for x, _ in batches:
        x = x.to(memory_format=fmt)
        t_logits.append(teacher(x))
        s_logits.append(student(x))
    return {**_compare(s_logits, t_logits, [y for _, y in batches], n_images), "images": n_images}


def _compare(logits: list[torch.Tensor], t_logits: list[torch.Tensor], labels: list[torch.Tensor],
             n_images: int) -> dict[str, float]:
    """Held-out loss and top-1 of `logits`, their changes from the teacher's, and KL(teacher || them)."""
    def summary(outs) -> tuple[float, float]:
        loss = sum(float(F.cross_entropy(o.float(), y.to(o.device), reduction="sum")) for o, y in zip(outs, labels))
        correct = sum(float((o.argmax(1) == y.to(o.device)).sum()) for o, y in zip(outs, labels))
        return loss / n_images, 100.0 * correct / n_images

    loss, top1 = summary(logits)
    t_loss, t_top1 = summary(t_logits)
    kl = sum(float(F.kl_div(F.log_softmax(o.float(), 1), F.log_softmax(t.float(), 1), log_target=True,
                            reduction="sum")) for o, t in zip(logits, t_logits)) / n_images
    return {"loss": loss, "top1": top1, "d_loss": loss - t_loss, "d_acc": top1 - t_top1, "kl": kl}


def _teacher_and_base(run: Path, context: dict | None, device: torch.device,
                      fmt: torch.memory_format) -> tuple[nn.Module, nn.Module]:
    """(teacher, base), both in eval mode: `base` is the network whose layers the candidates
    replace, the teacher object itself without a `context`, or with one that plan's student
    with phase-1 weights and statistics (as the candidates themselves are scored)."""
    from hant.run import Run

    teacher = Run(run).teacher().to(device, memory_format=fmt).eval()
    if context is None:
        return teacher, teacher
    from hant.student import assemble

    base = assemble(run, {"layers": context["layers"]}, bn_recalibrate=False, redistilled=False)
    return teacher, base.to(device, memory_format=fmt).eval()


def _split_scored(prev: dict[tuple[str, str], dict],
                  todo: list[dict]) -> tuple[dict[tuple[str, str], dict], list[dict]]:
    """(done, pending): the rows of a previous scoring (`_previous`) that hold `todo`'s entries
    with the same weights, by (layer, spec), and the entries still to score."""
    done: dict[tuple[str, str], dict] = {}
    pending: list[dict] = []
    for e in todo:
        old = prev.get((e["layer"], e["spec"]))
        # Weights that could not be read are tried again: phase 1 may have recomputed them since.
        if old is not None and old.get("sha256") == e.get("sha256") and not old.get("unreadable"):
            done[(e["layer"], e["spec"])] = old
        else:
            pending.append(e)
    return done, pending


def _chunk_modules(run: Path, layer: LayerInfo, chunk: list[dict], teacher_layer: nn.Module, device: torch.device,
                   fmt: torch.memory_format) -> tuple[dict[str, nn.Module], list[tuple[dict, HantError]]]:
    """(modules, failures): the chunk's candidates built with their phase-1 weights, by spec,
    and the entries whose weights could not be read, each with its error."""
    import copy

    modules: dict[str, nn.Module] = {}
    failures: list[tuple[dict, HantError]] = []
    for e in chunk:
        if e["spec"] == "teacher":
            modules["teacher"] = copy.deepcopy(teacher_layer)
            continue
        try:
            modules[e["spec"]] = _load_candidate(run, layer, e, teacher_layer).to(device, memory_format=fmt)
        except HantError as err:
            failures.append((e, err))
    return modules, failures


def _score_eval(run: Path, cfg, layers, todo: list[dict], log, path: Path,
                context: dict | None = None) -> dict[str, Any]:
    """Score `todo`'s candidates by replacing one layer at a time of the teacher (or, with a
    plan's `context`, of that plan's student) on the held-out images; the document for
    scores.json (or the context's file), written to `path` after every chunk and resumed
    from it."""
    from hant.layers import get_layer
    from hant.workspace import fault_point, write_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # On the CPU channels_last makes these convnets much faster (DESIGN.md, environment facts).
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    teacher, base = _teacher_and_base(run, context, device, fmt)
    if context is not None:  # in a plan's context the teacher's own layer is a candidate too
        todo = [{"layer": d.name, "spec": "teacher", "sha256": None} for d in layers] + todo
    batches, n_images = _heldout_batches(cfg)

    def on_device(it):
        for x, y in it:
            yield x.to(device, memory_format=fmt), y.to(device)

    labels = [y for _, y in batches]
    with torch.no_grad():
        t_logits = [teacher(x) for x, _ in on_device(batches)]
        b_logits = t_logits if context is None else [base(x) for x, _ in on_device(batches)]
    t_eval = _compare(t_logits, t_logits, labels, n_images)
    in_shape = (cfg.data.in_chans, cfg.data.input_size, cfg.data.input_size)
    teacher_info = {"loss": t_eval["loss"], "top1": t_eval["top1"], "params": sum(p.numel() for p in teacher.parameters()),
                    "flops": count_flops(teacher, in_shape), "images": n_images}
    plan_info = None
    if context is not None:
        plan_info = {"name": context.get("name"), "layers": context["layers"],
                     **_compare(b_logits, t_logits, labels, n_images)}

    done, pending = _split_scored(_previous(path, "eval", n_images, log, context), todo)
    if done:
        log(f"scores: {len(done)} candidates already scored, {len(pending)} to go")

    # Entries in the index's order, so that the file does not depend on where a run was resumed.
    order = {(e["layer"], e["spec"]): i for i, e in enumerate(todo)}

    def snapshot(complete: bool = False) -> dict[str, Any]:
        rows = sorted(done.values(), key=lambda r: order.get((r["layer"], r["spec"]), len(order)))
        out = {"version": 1, "method": "eval", "images": n_images, "teacher": teacher_info,
               "entries": (_teacher_entries(layers) if context is None else []) + rows}
        if context is not None:
            out.update(plan=plan_info, complete=complete)
        return out

    bar = _bar(len(pending) * n_images, "score")

    chunks = 0
    try:
        for layer in layers:
            mine = [e for e in pending if e["layer"] == layer.name]
            teacher_layer = get_layer(teacher, layer.name)
            for start in range(0, len(mine), _CHUNK):
                chunk = mine[start:start + _CHUNK]
                modules, failures = _chunk_modules(run, layer, chunk, teacher_layer, device, fmt)
                for e, err in failures:
                    done[(e["layer"], e["spec"])] = {
                        "layer": e["layer"], "spec": e["spec"], "d_loss": None, "d_acc": None, "kl": None,
                        "sha256": e.get("sha256"), "status": "failed", "reason": str(err), "unreadable": True}
                    bar.update(n_images)
                bar.set_postfix_str(f"{layer.name} {start + len(chunk)}/{len(mine)}", refresh=False)
                if modules:
                    res = replacement_scores(base, layer.name, modules, on_device(batches), b_logits,
                                             progress=bar.update)
                    sha256_of = {e["spec"]: e.get("sha256") for e in chunk}
                    for spec, r in res.items():  # one per module: the unreadable ones are in `done` already
                        row = {"layer": layer.name, "spec": spec, **r, **_size(layer, modules[spec]),
                               "sha256": sha256_of[spec], "status": "done"}
                        if r["d_loss"] is None:
                            row.update(status="failed", reason="non-finite output on the held-out split")
                        done[(layer.name, spec)] = row
                write_json(path, snapshot())
                chunks += 1
                fault_point("score:after_chunk", chunks)
    finally:
        bar.close()
    return snapshot(complete=True)
