"""The two training tasks of the seed, as losses over CLIPFineTuner's normalised embeddings."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, with gradients flowing back to their owners.

    Every rank then computes the loss over the whole global batch; the gathered gradient each rank
    receives is the sum over ranks, and DeepSpeed's gradient averaging divides it back: the result
    is the gradient of the global-batch loss (open_clip's gather_with_grad, full-loss variant).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


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


def classification_loss(
    image: torch.Tensor, class_text: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor, templates: int
) -> torch.Tensor:
    return F.cross_entropy(classification_logits(image, class_text, scale, templates), labels)
