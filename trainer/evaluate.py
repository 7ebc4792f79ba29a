"""Evaluation at the start (baseline) and after every epoch: CIFAR-10 accuracy through the class
prompts, Flickr8k retrieval recall both ways. Every rank embeds its share; the metrics are computed
over the gathered embeddings, each eval sample counted once."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from plumbing.config import require

log = logging.getLogger("trainer.eval")


@dataclass
class EvalConfig:
    at_start: bool = True
    """Evaluate before the first step (the baseline the demo's before/after table shows)."""
    every_epochs: int = 1
    """Evaluate after every N epochs (0: never; the last epoch is always evaluated when N > 0)."""
    batch_size: int = 64
    """Eval batch per rank."""
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    """k of the retrieval Recall@k metrics."""

    def __post_init__(self) -> None:
        require(self.every_epochs >= 0, self, "every_epochs", "an int >= 0")
        require(self.batch_size >= 1, self, "batch_size", "an int >= 1")
        require(all(k >= 1 for k in self.recall_at), self, "recall_at", "ks >= 1")


# --------------------------------------------------------------------------- metrics (pure)


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


# --------------------------------------------------------------------------- gathering


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks (eval slots are padded to equal length)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_max(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_sum(values: list[float], device: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- evaluators


class Evaluator:
    def __init__(
        self,
        cfg: EvalConfig,
        objective: str,
        make_loader: Any,
        class_prompts: dict[str, torch.Tensor] | None,
        templates: int,
        tokenize: Any,
        device: str,
    ) -> None:
        self.cfg, self.objective, self.make_loader = cfg, objective, make_loader
        self.class_prompts, self.templates, self.tokenize, self.device = (
            class_prompts,
            templates,
            tokenize,
            device,
        )

    @classmethod
    def of(
        cls, cfg: Any, data: Any, class_prompts: dict[str, torch.Tensor] | None, collate: Any, device: str
    ) -> Evaluator:
        """From a TrainConfig, the run's TrainData and Collate."""

        def loader() -> Any:  # a fresh loader per evaluation
            return data.eval_loader(cfg.eval.batch_size)

        return cls(
            cfg.eval,
            cfg.train.objective,
            loader,
            class_prompts,
            len(cfg.train.class_templates),
            collate.tokenize,
            device,
        )

    def should_eval(self, epoch_done: int, last: bool) -> bool:
        if self.cfg.every_epochs == 0:
            return False
        return last or epoch_done % self.cfg.every_epochs == 0

    @torch.no_grad()
    def run(self, engine: Any) -> dict[str, float]:
        was_training = engine.training
        engine.eval()
        try:
            return self._accuracy(engine) if self.objective == "classification" else self._retrieval(engine)
        finally:
            engine.train(was_training)

    def _accuracy(self, engine: Any) -> dict[str, float]:
        assert self.class_prompts is not None
        _, class_text, scale = engine(
            input_ids=self.class_prompts["input_ids"].to(self.device),
            attention_mask=self.class_prompts["attention_mask"].to(self.device),
        )
        from trainer.objectives import classification_logits

        correct = {1: 0, 5: 0}
        count = 0
        for batch in self.make_loader():
            image, _, _ = engine(pixel_values=batch["pixel_values"].to(self.device))
            valid = batch["valid"].to(self.device)
            logits = classification_logits(image.float(), class_text.float(), scale.float(), self.templates)[
                valid
            ]
            hits = topk_correct(logits, batch["labels"].to(self.device)[valid], correct)
            correct = {k: correct[k] + hits[k] for k in correct}
            count += int(valid.sum())
        c1, c5, n = all_sum([correct[1], correct[5], count], self.device)
        return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "samples": n}

    def _retrieval(self, engine: Any) -> dict[str, float]:
        images, texts, owners, valids, indices = [], [], [], [], []
        for batch in self.make_loader():
            image, _, _ = engine(pixel_values=batch["pixel_values"].to(self.device))
            captions = batch["captions"]
            per = max(len(c) for c in captions)
            flat = [c[i] if i < len(c) else c[0] for c in captions for i in range(per)]
            tokens = self.tokenize(flat)
            _, text, _ = engine(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            has = torch.tensor([[i < len(c) for i in range(per)] for c in captions], device=self.device)
            images.append(image.float())
            texts.append(text.float().view(len(captions), per, -1))
            owners.append(has)
            valids.append(batch["valid"].to(self.device))
            indices.append(batch["index"].to(self.device))
        image = gather_rows(torch.cat(images))
        caption_pad = int(
            all_max(max(t.shape[1] for t in texts), self.device)
        )  # all_gather needs equal shapes
        text = gather_rows(
            torch.cat([torch.nn.functional.pad(t, (0, 0, 0, caption_pad - t.shape[1])) for t in texts])
        )
        has = gather_rows(
            torch.cat([torch.nn.functional.pad(h, (0, caption_pad - h.shape[1])) for h in owners])
        )
        valid = gather_rows(torch.cat(valids))
        index = gather_rows(torch.cat(indices))
        order = index[
            valid
        ].argsort()  # dataset order, however ranks and workers interleaved: ties then break alike
        image, text, has = image[valid][order], text[valid][order], has[valid][order]
        text_image = torch.arange(image.shape[0], device=self.device)[:, None].expand_as(has)[has]
        metrics = retrieval_recall(image, text[has], text_image, self.cfg.recall_at)
        metrics["images"] = float(image.shape[0])
        return metrics
