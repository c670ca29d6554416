"""Before fine-tuning: the network's output layer fitted to the teacher's logits.

An assembled student's features reach the classifier at another scale and in another mix
than the teacher's, so its logits start far from the teacher's even when its top-1 is
close: on the demo run's batch-64 3x student (re-distilled, BatchNorm re-estimated) the
penultimate features had norm 5.9 against the teacher's 2.4 (cosine 0.68), and
KL(teacher || student) was 0.72 nats at 88.9% top-1. The first steps of fine-tuning then
spend large gradients on every layer to correct what one linear layer can. Fitting that
layer first is linear probing before fine-tuning: a ridge regression of the teacher's
logits on the student's penultimate features, closed form, on the train batches that
BatchNorm statistics are re-estimated on. It took that student's KL to 0.14.

The fit is kept only when it lowers the KL on images it was not fitted on (the last
quarter of the batches), then refitted on all of them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hant.data import batch_inputs

__all__ = ["fit_output_layer", "HEAD_FIT_RIDGE"]

# The ridge penalty, relative to the mean diagonal of the features' Gram matrix (the mean
# squared feature), so it means the same for any feature scale. On the demo's 3x student
# (fitted on 4,096 train images) 0.036 took the held-out KL to 0.139, 0.36 to 0.152 and
# 3.6 to 0.186; the best scalar on the logits reached 0.157.
HEAD_FIT_RIDGE = 0.03
_VALIDATION_SHARE = 0.25


def _output_linear(model: nn.Module, x: torch.Tensor) -> tuple[str | None, torch.Tensor | None,
                                                                torch.Tensor | None, str]:
    """The nn.Linear whose output is the model's output on `x`: (name, its input rows, the
    output, why not when none)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None, None, None, "it has no nn.Linear"
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in linears]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    for n, (inp, o) in seen.items():
        if o is out and inp.dim() == 2:
            return n, inp, out, ""
    return None, None, out, "its output is not the output of an nn.Linear on flat features"


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                          reduction="batchmean"))


def _ridge(x: torch.Tensor, t: torch.Tensor, bias: bool, ridge: float) -> torch.Tensor:
    """Least squares of `t` on `x` (plus a constant column with `bias`, not penalised), in
    float64; returns the coefficients, (features [+1]) x outputs."""
    if bias:
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    gram = x.T @ x
    d = gram.shape[0] - int(bias)
    penalty = ridge * float(gram.diagonal()[:d].mean().clamp_min(1e-12))
    gram[range(d), range(d)] += penalty
    return torch.linalg.solve(gram, x.T @ t)


@torch.no_grad()
def fit_output_layer(model: nn.Module, teacher: nn.Module, batches: Iterable, max_batches: int,
                     device: torch.device | str = "cpu", ridge: float = HEAD_FIT_RIDGE) -> dict[str, Any]:
    """Refit `model`'s output layer (the nn.Linear whose output is the model's output) to
    `teacher`'s logits on up to `max_batches` of `batches` ((x, y) pairs or tensors), both
    networks in eval mode.

    Ridge regression of the teacher's logits on the layer's inputs (`ridge` relative to the
    mean squared feature), first on the batches but the last quarter (at least one image is
    held back) to see whether KL(teacher || model) falls on the rest; only then refitted on
    all and written into the layer. The model's train/eval mode is restored.

    Returns {"layer", "images", "kl_before", "kl_after" (on the held-back images), "applied"}
    or {"applied": False, "reason"} when there is no such layer, its output does not match
    the teacher's, or there are fewer than 2 images.
    """
    was = model.training
    model.eval()
    teacher.eval()
    feats, logits, targets = [], [], []
    name = None
    try:
        for x in batch_inputs(batches, max_batches, device):
            layer, inp, out, why = _output_linear(model, x)
            if layer is None:
                return {"applied": False, "reason": f"{type(model).__name__}: {why}"}
            name = name or layer
            t = teacher(x)
            if t.shape != out.shape:
                return {"applied": False, "reason": f"the model's output {tuple(out.shape[1:])} is not the teacher's "
                                                    f"{tuple(t.shape[1:])}"}
            feats.append(inp.double().cpu())
            logits.append(out.double().cpu())
            targets.append(t.double().cpu())
    finally:
        model.train(was)
    n = sum(len(f) for f in feats)
    if n < 2:
        return {"applied": False, "reason": f"{n} image(s) to fit on"}
    x, s, t = torch.cat(feats), torch.cat(logits), torch.cat(targets)
    held = max(1, math.ceil(_VALIDATION_SHARE * n))
    layer = model.get_submodule(name)
    bias = layer.bias is not None
    coef = _ridge(x[:-held], t[:-held], bias, ridge)
    fitted = (torch.cat([x[-held:], x.new_ones(held, 1)], 1) if bias else x[-held:]) @ coef
    before, after = _kl(s[-held:], t[-held:]), _kl(fitted, t[-held:])
    result = {"layer": name, "images": n, "kl_before": before, "kl_after": after, "applied": after < before}
    if result["applied"]:
        coef = _ridge(x, t, bias, ridge)
        layer.weight.copy_(coef[:x.shape[1]].T.to(layer.weight))
        if bias:
            layer.bias.copy_(coef[-1].to(layer.bias))
    return result
