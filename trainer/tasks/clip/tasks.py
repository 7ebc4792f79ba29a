"""The two CLIP tasks: classification through class prompts (CIFAR-10) and contrastive
image–caption matching over the global batch (Flickr8k)."""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core import jpeg
from core.clip import CLIPFineTuner, load_processors, text_length
from core.manifest import Manifest
from core.preprocess import Collate, ImageTransform
from plumbing.dist import DistInfo, all_max, all_sum, gather_rows
from plumbing.errors import UserError
from trainer.config import TrainConfig
from trainer.data import pick_caption
from trainer.engine import Engine, load_weights
from trainer.run import RunFolder
from trainer.tasks.base import Batch, Evaluation, Skeleton
from trainer.tasks.clip.model import build_finetuner, freeze, model_source, skeleton_model
from trainer.tasks.clip.objective import (
    classification_logits,
    contrastive_loss,
    retrieval_recall,
    topk_correct,
)

log = logging.getLogger("trainer.clip")


class ClipPrep:
    """A decoded sample → uint8 pixels (CLIP's transform; the train one may crop and flip at random,
    drawn from the sample's seed) and one of its captions. With `on_device` (data.decode=gpu) a JPEG
    the device can decode keeps its bytes and its planned crop instead (core.jpeg)."""

    def __init__(
        self,
        train: ImageTransform,
        evaluation: ImageTransform,
        captions: str = "draw",
        on_device: bool = False,
    ) -> None:
        self.train, self.evaluation, self.captions, self.on_device = train, evaluation, captions, on_device

    def __call__(self, sample: dict[str, Any], draw: int, train: bool) -> dict[str, Any]:
        transform = self.train if train else self.evaluation
        image, data, rng = sample.pop("image"), sample.pop("encoded", b""), random.Random(draw)
        if self.on_device and jpeg.deferrable(image, data):
            sample["jpeg"] = (data, transform.plan(image.size, rng))
        else:
            sample["pixel_values"] = transform(image, rng)
        return pick_caption(sample, draw, train, self.captions)


class ClipTask:
    """What the two CLIP objectives share: the model, its preprocessing, its export."""

    with_text = True

    def __init__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> None:
        self.cfg, self.model_cfg, self.device = cfg, cfg.model, device
        self.source = model_source(cfg.model, run.base_model, info)
        self.tokenizer, self.processor = load_processors(self.source)
        self.max_length = text_length(self.source)
        self.collate = Collate(self.tokenizer, self.max_length, self.with_text, self.processor)
        d = cfg.data
        self.prep = ClipPrep(
            ImageTransform.of(self.processor, d.random_crop, d.crop_scale_min, d.hflip),
            ImageTransform.of(self.processor),
            d.captions,
            d.decode == "gpu",
        )
        self.dtype = torch.float32

    def build(self) -> torch.nn.Module:
        model = build_finetuner(self.model_cfg, self.source)
        freeze(model, self.model_cfg)
        return model

    def encode(
        self, engine: Engine, batch: Batch, text: Batch | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """The engine's embeddings (float32) of whatever the batch holds: its pictures (decoded on the
        device with data.decode=gpu, core.jpeg) and its captions, or the captions `text` holds."""
        self.dtype = next(engine.module.parameters()).dtype
        pixels = None if "pixel_values" not in batch else jpeg.pixels(batch, self.device)
        tokens = batch if text is None else text
        ids, mask = tokens.get("input_ids"), tokens.get("attention_mask")
        image, text_embeddings, scale = engine(
            pixel_values=None if pixels is None else self.collate.normalise(pixels, self.dtype),
            input_ids=None if ids is None else ids.to(self.device, non_blocking=True),
            attention_mask=None if mask is None else mask.to(self.device, non_blocking=True),
        )
        return (
            None if image is None else image.float(),
            None if text_embeddings is None else text_embeddings.float(),
            scale.float(),
        )

    def after_step(self, engine: Engine) -> None:
        pass

    def shown(self, batch: Batch) -> torch.Tensor:
        pixels = jpeg.pixels({**batch, "skipped": 0}, self.device)  # the loss counts replacements
        return pixels[:16].float().cpu() / 255  # uint8, as the model gets them

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export(
        self, weights: Mapping[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        model = build_finetuner(self.model_cfg, self.source)
        load_weights(model, weights, optional=("clip.logit_scale",))  # frozen, 0-dim, set from ours on save
        model.save_pretrained(out, self.tokenizer, self.processor)

    def exported(self, out: Path) -> dict[str, torch.Tensor]:
        return dict(CLIPFineTuner.from_pretrained(out).named_parameters())

    def expected_export(self, name: str, live: torch.Tensor) -> torch.Tensor | None:
        return None if name == "clip.logit_scale" else live

    def release(self) -> None:
        pass

    def hyperparameters(self) -> dict[str, Any]:
        m = self.model_cfg
        return {"model": m.preset or m.name, "head": m.head}

    @staticmethod
    def check(cfg: TrainConfig, manifest: Manifest) -> None:
        pass

    @classmethod
    def skeleton(cls, cfg: TrainConfig, manifest: Manifest | None) -> Skeleton | None:
        """The fine-tuner on the meta device, and the engine's forward of a step: the batch's images
        and `texts(batch)` token rows (no attention mask: on the meta device the model's padding
        checks would need values; the shapes, and so the memory, are the same)."""
        model = skeleton_model(cfg.model)
        if model is None:
            return None
        config = model.clip.config
        side, length = config.vision_config.image_size, config.text_config.max_position_embeddings
        texts = cls.texts(cfg, manifest)

        def forward(module: torch.nn.Module, batch: int, dtype: torch.dtype) -> Any:
            pixels = torch.zeros(batch, 3, side, side, dtype=dtype, device="meta")
            ids = torch.zeros(texts(batch), length, dtype=torch.long, device="meta")
            return module(pixel_values=pixels, input_ids=ids)

        return Skeleton(model, forward)

    @staticmethod
    def texts(cfg: TrainConfig, manifest: Manifest | None) -> Callable[[int], int]:
        """Text rows the engine encodes in a step of `batch` images: one caption each."""
        return lambda batch: batch


class ClipContrastive(ClipTask):
    """Symmetric InfoNCE over the global batch (embeddings gathered across ranks with gradients)."""

    def loss(self, engine: Engine, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, text, scale = self.encode(engine, batch)
        assert image is not None and text is not None
        return contrastive_loss(image, text, scale), {"train/temperature": scale.detach()}

    def evaluate(self, engine: Engine, batches: Iterable[Batch], step: int) -> Evaluation:
        """Recall@k both ways over the whole eval split, each image and caption counted once."""
        images, texts, owners, valids, indices = [], [], [], [], []
        for batch in batches:
            image, _, _ = self.encode(engine, batch, text={})
            captions = batch["captions"]
            per = max(len(c) for c in captions)
            flat = [c[i] if i < len(c) else c[0] for c in captions for i in range(per)]
            _, text, _ = self.encode(engine, dict(self.collate.tokenize(flat)))
            assert image is not None and text is not None
            has = torch.tensor([[i < len(c) for i in range(per)] for c in captions], device=self.device)
            images.append(image)
            texts.append(text.view(len(captions), per, -1))
            owners.append(has)
            valids.append(batch["valid"].to(self.device))
            indices.append(batch["index"].to(self.device))
        pad = int(all_max([max(t.shape[1] for t in texts)])[0])  # gathering needs equal shapes
        image = gather_rows(torch.cat(images))
        text = gather_rows(torch.cat([F.pad(t, (0, 0, 0, pad - t.shape[1])) for t in texts]))
        has = gather_rows(torch.cat([F.pad(h, (0, pad - h.shape[1])) for h in owners]))
        valid, index = gather_rows(torch.cat(valids)), gather_rows(torch.cat(indices))
        # dataset order, however ranks and workers interleaved: ties then break alike everywhere
        order = index[valid].argsort()
        image, text, has = image[valid][order], text[valid][order], has[valid][order]
        text_image = torch.arange(image.shape[0], device=self.device)[:, None].expand_as(has)[has]
        metrics = retrieval_recall(image, text[has], text_image, self.cfg.eval.recall_at)
        metrics["images"] = float(image.shape[0])
        return Evaluation(metrics)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "objective": "contrastive"}


class ClipClassification(ClipTask):
    """Cross-entropy over the scaled similarities of each image to every class's prompts."""

    with_text = False

    def __init__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> None:
        super().__init__(cfg, run, info, device)
        self.templates = len(cfg.train.class_templates)

    @functools.cached_property
    def prompts(self) -> dict[str, torch.Tensor]:
        """Every class name in every template, tokenised (the classes come from the manifest)."""
        from core.manifest import load_manifest

        classes = load_manifest(Path(self.cfg.data.manifest)).classes
        texts = [t.format(label=name) for name in classes for t in self.cfg.train.class_templates]
        return dict(self.collate.tokenize(texts))

    def loss(self, engine: Engine, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, class_text, scale = self.encode(engine, batch, text=self.prompts)
        assert image is not None and class_text is not None
        logits = classification_logits(image, class_text, scale, self.templates)
        loss = F.cross_entropy(logits, batch["labels"].to(self.device))
        return loss, {"train/temperature": scale.detach()}

    def evaluate(self, engine: Engine, batches: Iterable[Batch], step: int) -> Evaluation:
        """Top-1 and top-5 accuracy through the class prompts, each eval image counted once."""
        _, class_text, scale = self.encode(engine, self.prompts)
        assert class_text is not None
        correct, count = {1: 0, 5: 0}, 0
        for batch in batches:
            image, _, _ = self.encode(engine, batch, text={})
            assert image is not None
            valid = batch["valid"].to(self.device)
            logits = classification_logits(image, class_text, scale, self.templates)[valid]
            hits = topk_correct(logits, batch["labels"].to(self.device)[valid], correct)
            correct = {k: correct[k] + hits[k] for k in correct}
            count += int(valid.sum())
        c1, c5, n = all_sum([correct[1], correct[5], count])
        return Evaluation({"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "samples": n})

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "objective": "classification"}

    @staticmethod
    def texts(cfg: TrainConfig, manifest: Manifest | None) -> Callable[[int], int]:
        """Every class in every template, whatever the batch (CIFAR-10's ten without a manifest)."""
        classes = len(manifest.classes) if manifest is not None and manifest.classes else 10
        return lambda batch: classes * len(cfg.train.class_templates)

    @staticmethod
    def check(cfg: TrainConfig, manifest: Manifest) -> None:
        if not manifest.classes:
            raise UserError(
                f"{manifest.root / 'manifest.json'}: train.objective=classification needs class names (a cifar10 manifest)"
            )
