"""A tiny run folder for the phase-3 tests, built without phase 1 or the latency stage.

Teacher: timm's `test_efficientnet` (100k parameters, five layers at 32x32), random weights
saved as its checkpoint so every stage loads the same teacher. Candidates: built by
hant.ops with fixed seeds and saved as phase 1 would (index.json with file and sha256).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hant.config import RunConfig
from hant.data import load_data
from hant.layers import discover_layers, get_layer
from hant.ops import build
from hant.teacher import create_model
from hant.workspace import RunDir, save_safetensors, sha256_file, write_json

SOURCE = "timm:test_efficientnet"
SIZE = 32


def make_run(root: Path, specs: dict[str, list[str]] | None = None, images: int = 120, epochs: float = 2.0,
             source: str = SOURCE) -> Path:
    """Write config.yaml, layers.json, a teacher checkpoint and candidates/ under `root`.

    `specs` maps a layer index (as a string, e.g. "1") or name to the specs to save weights for;
    default: every layer gets `proj` and `mb_k3_e1_relu` (where valid).
    """
    rd = RunDir(root)
    cfg = RunConfig()
    cfg.model.source = source
    cfg.data.spec = f"synthetic:{images}"
    cfg.data.input_size = SIZE
    cfg.data.heldout = 16
    cfg.data.batch_size = 16
    splits = load_data(cfg.data)
    cfg.data = splits.record(cfg.data)
    cfg.finetune.epochs = epochs
    cfg.finetune.min_steps = 0  # the epochs as given (tests count steps)
    cfg.finetune.batch_size = 16
    cfg.finetune.bn_batches = 2
    cfg.finetune.lr = 2e-3
    cfg.latency.warmup = 1
    cfg.latency.min_repeats = 3
    cfg.latency.max_repeats = 5
    cfg.latency.time_cap_s = 20.0
    cfg.latency.min_time_s = 0.0  # tiny networks; nothing here asserts a timing

    torch.manual_seed(0)
    teacher = create_model(source, cfg.data.in_chans, cfg.data.num_classes).eval()
    # Non-trivial BatchNorm statistics, so that re-estimating them visibly changes something.
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = root / "teacher.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    save_safetensors(ckpt, teacher.state_dict())
    cfg.model.checkpoint = str(ckpt)
    cfg.save(rd.config)

    layers, skipped = discover_layers(teacher, (cfg.data.in_chans, SIZE, SIZE))
    write_json(rd.layers, {"checkpoint_sha256": sha256_file(ckpt), "layers": [l.to_dict() for l in layers],
                           "skipped": skipped})
    entries = []
    for i, info in enumerate(layers):
        wanted = (specs or {}).get(str(i), (specs or {}).get(info.name)) if specs else ["proj", "mb_k3_e1_relu"]
        for spec in wanted or []:
            torch.manual_seed(1000 + i)
            module = build(spec, info.in_chs, info.out_chs, info.stride,
                           teacher_layer=get_layer(teacher, info.name))
            f = rd.candidate_file(info.name, spec)
            sha = save_safetensors(f, module.state_dict())
            entries.append({"layer": info.name, "spec": spec, "status": "done", "init": "random",
                            "train_loss": 0.1, "heldout_loss": 0.1,
                            "file": str(f.relative_to(rd.root)), "sha256": sha})
    write_json(rd.candidates_index, {"candidates": entries})
    return root


def layer_names(root: Path) -> list[str]:
    from hant.workspace import read_json

    return [e["name"] for e in read_json(RunDir(root).layers)["layers"]]


def write_plan(root: Path, name: str, layers: dict[str, str], target: str = "onnxruntime-cpu") -> Path:
    """RUN/plans/<name>.json with the given {layer: spec}."""
    return write_json(RunDir(root).plan(name), {"target": target, "batch_size": 1, "budget_ms": 1.0,
                                                "layers": layers, "predicted_ms": 0.5, "status": "optimal"})
