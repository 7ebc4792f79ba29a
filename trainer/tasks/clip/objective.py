"""The CLIP losses and metrics, pure functions of embeddings: InfoNCE over the global batch,
classification through prompt ensembles, top-k accuracy, Recall@k both ways."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from plumbing.dist import gather_with_grad


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: image i matches text i (CLIP, Radford et al. 2021)."""
    image, text = gather_with_grad(image), gather_with_grad(text)
    logits = scale * image @ text.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def classification_logits(
    image: torch.Tensor, class_text: torch.Tensor, scale: torch.Tensor, templates: int
) -> torch.Tensor:
    """Scaled similarity of each image to each class: the mean over templates of the class prompts'
    embeddings, renormalised (CLIP's zero-shot prompt ensembling)."""
    classes = class_text.view(-1, templates, class_text.shape[-1]).mean(dim=1)
    return scale * image @ F.normalize(classes, dim=-1).t()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int]) -> dict[int, int]:
    """How many rows have their label among the k highest logits."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def retrieval_recall(
    image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor, ks: Iterable[int]
) -> dict[str, float]:
    """Recall@k both ways. `text_image[j]` is the image row that caption j belongs to.

    image→text: an image query hits when any of its captions ranks in the top k;
    text→image: a caption query hits when its image ranks in the top k.
    """
    sim = image @ text.t()  # images × captions
    out: dict[str, float] = {}
    owner = text_image[None, :] == torch.arange(image.shape[0], device=image.device)[:, None]
    # stable: equal scores (identical captions) rank in dataset order, reproducibly
    order_t = sim.argsort(dim=1, descending=True, stable=True)
    order_i = sim.t().argsort(dim=1, descending=True, stable=True)
    for k in ks:
        out[f"i2t_R@{k}"] = float(torch.gather(owner, 1, order_t[:, :k]).any(dim=1).float().mean())
        out[f"t2i_R@{k}"] = float((order_i[:, :k] == text_image[:, None]).any(dim=1).float().mean())
    return out
