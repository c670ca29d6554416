"""Embedding compatibility: whether a student's features can stand in for its teacher's.

Users who index images with the teacher's penultimate features (retrieval, clustering,
a downstream head) need a student whose features live in the same space, or they must
re-embed their whole gallery. Two numbers say how far that holds, on the test split:

- `cosine`: the mean cosine similarity of the student's and the teacher's penultimate
  features of the same image;
- cross-model retrieval top-1: each test image, embedded by the student, is a query against
  the other test images embedded by the teacher (its own teacher embedding excluded); a
  hit is a nearest neighbour (cosine) of the query's class. Beside it, the same with
  teacher queries, which is what the gallery's owner gets today.

The penultimate features are the input of the model's last `nn.Linear` in the forward
pass (the classifier of timm and torchvision networks, and of most user networks),
flattened per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hant.errors import HantError

__all__ = ["penultimate_features", "compatibility", "retrieval_top1"]


def _last_linear(model: nn.Module) -> str | None:
    """The name of the model's last registered nn.Linear (its classifier, in timm, torchvision
    and most user networks)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@torch.no_grad()
def penultimate_features(model: nn.Module, loader, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of `layer` (default: the model's last nn.Linear) for every image of `loader`.

    Takes a model and a loader of (x, y) batches. Returns (features N x D float32 on the CPU,
    labels N). The model is run in eval mode and its train/eval mode restored. Raises
    HantError when the model has no nn.Linear (and no `layer` is given) or the layer is not
    called.
    """
    name = layer or _last_linear(model)
    if name is None:
        raise HantError(f"{type(model).__name__} has no nn.Linear classifier whose input would be its features")
    module = model.get_submodule(name)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach().flatten(1).float().cpu()))
    was = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for x, y in loader:
            n = len(feats)
            model(x.to(device))
            if len(feats) != n + 1:
                raise HantError(f"layer {name!r} was called {len(feats) - n} times in one forward pass; "
                                "name the classifier whose input is the embedding")
            labels.append(y.cpu())
    finally:
        handle.remove()
        model.train(was)
    if not feats:
        raise HantError("the split is empty: no features to compare")
    return torch.cat(feats), torch.cat(labels)


def retrieval_top1(queries: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Leave-one-out nearest-neighbour top-1 (percent): query i against gallery j != i by cosine.

    `queries` and `gallery` embed the same N images (rows correspond); `labels` are theirs.
    """
    if len(queries) != len(gallery) or len(queries) != len(labels):
        raise ValueError("queries, gallery and labels must describe the same images")
    if len(queries) < 2:
        raise HantError("retrieval needs at least two images")
    q = nn.functional.normalize(queries, dim=1)
    g = nn.functional.normalize(gallery, dim=1)
    hits = 0
    for start in range(0, len(q), chunk):
        sim = q[start:start + chunk] @ g.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")  # the image itself is not in its gallery
        hits += int((labels[sim.argmax(1)] == labels[start:start + chunk]).sum())
    return 100.0 * hits / len(q)


def compatibility(student: nn.Module, teacher: nn.Module, loader, max_images: int | None = None) -> dict[str, Any]:
    """Cosine similarity and cross-model retrieval of `student` against `teacher` on `loader`.

    Returns {"images", "feature" (the layer whose input is used), "cosine" (mean over images),
    "retrieval_top1": {"student_to_teacher", "teacher_to_teacher"}} or, when the two
    networks' features differ in size (no shared space), {"images", "feature", "error"}.
    `max_images` keeps the first N images for retrieval (its cost grows as N squared).
    Raises HantError as `penultimate_features` does.
    """
    layer = _last_linear(student)
    fs, ys = penultimate_features(student, loader, layer)
    ft, yt = penultimate_features(teacher, loader)
    if not torch.equal(ys, yt):
        raise HantError("the loader gave the two networks different images; use an unshuffled loader")
    out: dict[str, Any] = {"images": len(ys), "feature": f"input of {layer}"}
    if fs.shape != ft.shape:
        out["error"] = f"student features have {fs.shape[1]} dimensions, the teacher's {ft.shape[1]}"
        return out
    out["cosine"] = float(nn.functional.cosine_similarity(fs, ft, dim=1).mean())
    n = len(ys) if max_images is None else min(len(ys), int(max_images))
    out["retrieval_images"] = n
    out["retrieval_top1"] = {"student_to_teacher": retrieval_top1(fs[:n], ft[:n], ys[:n]),
                             "teacher_to_teacher": retrieval_top1(ft[:n], ft[:n], ys[:n])}
    return out
