"""A user's own plain CNN through the Python API, on a small real dataset.

    .venv/bin/python bench/plain_cnn.py          # -> bench/results/plain_cnn.json

The case a new user brings: five Conv-BN-ReLU stages of their own (no library blocks),
trained on 1,200 real images (Fashion-MNIST at 28 px, the first 1,200 of a seeded shuffle
of its train split; 300 more held out for hant; the first 2,000 test images for top-1),
then `hant.accelerate(model, train, heldout, test_data=..., speedup=2)` with every default
(the default space, phase-1 budget, fine-tuning). It records the teacher's top-1, the
control (the teacher given the same fine-tuning as the student: `hant.finetune.
finetune_module` on a copy, the same loss and epochs), the student's top-1 and measured
speedup, the drop against the better of the two, the families the plan chose, what the
assembled student scored, and the warning `accelerate` gave, if any.

Resumable: the teacher is cached in --cache (default ~/.cache/hant/plain-cnn), the run folder
lives there too and `hant.accelerate` resumes it; the control is cached as JSON. About
15 min on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN, HELDOUT, TEST = 1200, 300, 2000
TEACHER_EPOCHS = 40


class PlainCNN(nn.Module):
    """Five Conv-BN-ReLU stages, the second and fourth with stride 2, global pooling, a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        chs = [1, 32, 64, 64, 128, 128]
        strides = [1, 2, 1, 2, 1]
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(a, b, 3, s, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
            for a, b, s in zip(chs, chs[1:], strides)])
        self.head = nn.Linear(chs[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _data(seed: int = 0):
    from hant.config import DataConfig
    from hant.data import load_data

    splits = load_data(DataConfig(spec="fashion-mnist", input_size=28, heldout=5000, seed=seed))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train), generator=g)
    train = splits.train.get_batch(idx[:TRAIN])
    held = splits.train.get_batch(idx[TRAIN:TRAIN + HELDOUT])
    test = splits.test.get_batch(torch.arange(TEST))
    return train, held, test


def _top1(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(data[0]).argmax(1) == data[1]).float().mean())


def _train_teacher(train, path: Path) -> nn.Module:
    torch.manual_seed(0)
    model = PlainCNN()
    if path.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=5e-4)
    steps = TEACHER_EPOCHS * ((len(train[0]) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    x, y = train
    for epoch in range(TEACHER_EPOCHS):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            xb = torch.where(torch.rand(len(b), 1, 1, 1) < 0.5, x[b], x[b].flip(3))  # horizontal flip
            loss = nn.functional.cross_entropy(model(xb), y[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path)
    return model.eval()


def _control(teacher: nn.Module, train, cfg, epochs: float, cache: Path, test) -> float:
    """The teacher fine-tuned like the student (the run's loss, schedule and epochs), its test top-1."""
    from hant.data import TensorImageDataset
    from hant.kd import finetune_module

    if cache.exists():
        return json.loads(cache.read_text())["top1"]
    ds = TensorImageDataset(train[0], train[1], mean=cfg.data.mean, std=cfg.data.std, input_size=28)
    model = copy.deepcopy(teacher)
    finetune_module(model, copy.deepcopy(teacher).eval(), cfg, ds, epochs=epochs, log=lambda *_: None)
    top1 = _top1(model, test)
    cache.write_text(json.dumps({"top1": top1, "epochs": epochs}))
    return top1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "hant" / "plain-cnn"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "plain_cnn.json"))
    args = p.parse_args(argv)
    import hant
    from hant.workspace import read_json, write_json

    cache = Path(args.cache).expanduser()
    t0 = time.perf_counter()
    train, held, test = _data()
    teacher = _train_teacher(train, cache / "teacher.safetensors")
    teacher_top1 = _top1(teacher, test)
    print(f"[plain-cnn] teacher: test top-1 {teacher_top1:.2f}% on {TEST} images", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = hant.accelerate(teacher, train, held, test_data=test, speedup=args.speedup, run=cache / "run")
    plan_name = r.plans[0]
    ev = r.evals[plan_name]
    plan = read_json(r.run / "plans" / f"{plan_name}.json")
    epochs = float(ev["finetune"]["epochs"])
    from hant.config import RunConfig

    cfg = RunConfig.load(r.run / "config.yaml")  # as `init` resolved it: data mean and std included
    control = _control(teacher, train, cfg, epochs, cache / f"control-e{epochs:g}.json", test)
    reference = max(teacher_top1, control)
    result = {
        "command": "bench/plain_cnn.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:])),
        "data": {"dataset": "fashion-mnist", "input_size": 28, "train": TRAIN, "heldout": HELDOUT, "test": TEST},
        "teacher": {"model": "PlainCNN: five Conv-BN-ReLU stages", "epochs": TEACHER_EPOCHS, "top1": teacher_top1},
        "control_top1": control, "speedup_asked": args.speedup,
        "speedup": ev["speedup"], "speedup_ci": [ev.get("speedup_ci_lo"), ev.get("speedup_ci_hi")],
        "top1": ev["student"]["top1"], "top1_assembled": ev["student"].get("top1_assembled"),
        "drop": reference - ev["student"]["top1"],
        "families": dict(Counter(s.split("_", 1)[0] for s in plan["layers"].values())), "layers": plan["layers"],
        "predicted_d_loss": plan["predicted"]["d_loss"], "accuracy_risk": plan.get("accuracy_risk"),
        "warnings": [str(w.message) for w in caught if "accuracy" in str(w.message)],
        "embedding": ev.get("embedding"), "phase1_images_per_candidate": json.loads((r.run / "candidates" / "index.json").read_text())
        .get("phase1", {}).get("images_per_candidate"),
        "fingerprint": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(Path(args.out), result)
    print(f"[plain-cnn] {ev['speedup']:.2f}x, top-1 {ev['student']['top1']:.2f}% (teacher {teacher_top1:.2f}%, "
          f"control {control:.2f}%), drop {result['drop']:.2f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
