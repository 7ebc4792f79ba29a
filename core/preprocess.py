"""CLIP's preprocessing, done once for every stage: images as CLIPImageProcessor prepares them (in
PIL, then normalised a batch at a time, on the device that runs the model) and captions tokenised as
the model was trained on them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from core.crop import Crop
from core.jpeg import pack


@dataclass(frozen=True)
class ImageTransform:
    """CLIP preprocessing with the model's own processor values, as CLIPImageProcessor does it: the
    short side resized (bicubic) to `size`, then a centre crop; for training optionally a random
    resized crop (torchvision's recipe) and horizontal flips, drawn from the sample's own generator.
    Planned as a `Crop` (the centre crop's box is the part of the source the resized image's crop
    came from, so one resize of the box gives its pixels), applied in PIL (a reduced JPEG decode where
    the output is smaller), giving uint8 CHW: whole batches are normalised at once, where the model
    runs (per image it cost more than the resize)."""

    size: int
    crop: tuple[int, int]  # height, width
    random_crop: bool = False
    scale_min: float = 0.8
    hflip: bool = False

    @classmethod
    def of(
        cls, processor: Any, random_crop: bool = False, scale_min: float = 0.8, hflip: bool = False
    ) -> ImageTransform:
        """From a CLIPImageProcessor; the defaults are the evaluation transform."""
        size = processor.size.get("shortest_edge") or min(processor.size.values())
        crop = (processor.crop_size["height"], processor.crop_size["width"])
        return cls(size, crop, random_crop, scale_min, hflip)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.plan(image.size, rng).apply(image)

    def plan(self, size: tuple[int, int], rng: random.Random) -> Crop:
        """The crop of an image of `size`, drawn from `rng` (the box first, then the flip)."""
        ch, cw = self.crop
        if self.random_crop:
            left, top, right, bottom = self._random_box(size, rng)
        else:  # the short side resized to `size`, then the centre cut: where in the source that lies
            w, h = size
            scale = self.size / min(w, h)
            rw, rh = max(cw, round(w * scale)), max(ch, round(h * scale))
            x, y = round((rw - cw) / 2), round((rh - ch) / 2)
            left, top, right, bottom = x * w / rw, y * h / rh, (x + cw) * w / rw, (y + ch) * h / rh
        return Crop((left, top, right, bottom), (cw, ch), self.hflip and rng.random() < 0.5)

    def _random_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: area fraction in [scale_min, 1], aspect in [3/4, 4/3]."""
        w, h = size
        for _ in range(10):
            area = w * h * rng.uniform(self.scale_min, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


class Collate:
    """Stacks images and tokenises texts with the model's tokenizer, once per batch. The pixels stay
    uint8 through the loader (a quarter of float32's bytes through shared and pinned memory and the
    host-to-device copy; the H200 drill of 2026-12-04 spent 35 % of its steps waiting for loader
    workers that also normalised): `normalise` runs on the device, in the model's process. Captions
    are padded to the batch's longest (`trim`, the default): CLIP's text tower is causal and pools at
    the end-of-text token, so padding after it changes nothing but the work (tests/test_core.py
    checks the embeddings are equal)."""

    def __init__(
        self, tokenizer: Any, max_length: int, with_text: bool, processor: Any, trim: bool = True
    ) -> None:
        self.tokenizer, self.max_length, self.with_text, self.trim = tokenizer, max_length, with_text, trim
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.size = (processor.crop_size["width"], processor.crop_size["height"])
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            **pack(samples, self.size),  # uint8 (see normalise), or JPEGs for the device (core.jpeg)
            "keys": [s["key"] for s in samples],
            "skipped": sum(s.get("skipped", 0) for s in samples),
            "valid": torch.tensor([s.get("valid", True) and not s.get("substitute", False) for s in samples]),
            "index": torch.tensor([s.get("index", -1) for s in samples]),
        }
        if "label" in samples[0]:
            batch["labels"] = torch.tensor([s["label"] for s in samples])
        if self.with_text:
            tokens = self.tokenize([s["text"] for s in samples])
            batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        if "captions" in samples[0]:
            batch["captions"] = [s["captions"] for s in samples]
        return batch

    def normalise(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 NCHW → `dtype`, with the processor's mean and std, on the pixels' device (in float32,
        then cast: the model's input rounds once). The mean and std are copied there once: a copy from
        pageable host memory waits for the GPU's queue to drain, every step."""
        if pixels.device not in self.on_device:
            self.on_device[pixels.device] = (self.mean.to(pixels.device), self.std.to(pixels.device))
        mean, std = self.on_device[pixels.device]
        return pixels.float().sub_(mean).div_(std).to(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_device": {}}  # loader workers get the collate, never device copies

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding="longest" if self.trim else "max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
