"""Samples → batches for the diffusion tasks: square crops in uint8, one caption (or the empty one
at caption_dropout), pixels to [-1, 1] and captions tokenised to full length."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.manifest import Manifest
from core.shards import captions_of, read_split, rgb
from plumbing.errors import UserError
from trainer.data import pick_caption
from trainer.tasks.base import Batch


class DiffusionPrep:
    """A decoded sample → uint8 pixels (short side resized to `side`, centre crop; no flips: captions
    say left and right) and one caption, or the empty one at `dropout` (drawn from the sample's seed)."""

    def __init__(self, side: int, dropout: float, captions: str = "draw") -> None:
        self.side, self.dropout, self.captions = side, dropout, captions

    def __call__(self, sample: dict[str, Any], draw: int, train: bool) -> dict[str, Any]:
        sample["pixel_values"] = square(sample.pop("image"), self.side)
        sample = pick_caption(sample, draw, train, self.captions)
        if train and self.dropout and random.Random(draw ^ 0x5EED).random() < self.dropout:
            sample["text"] = ""
        return sample


def square(image: Image.Image, side: int) -> torch.Tensor:
    """The short side resized to `side` (bicubic, antialiased), then the centre square, as uint8 CHW."""
    image = rgb(image)  # decoded here (core.shards.decode opens it lazily)
    w, h = image.size
    scale = side / min(w, h)
    w, h = max(side, round(w * scale)), max(side, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class DiffusionCollate:
    """Pixels stacked as uint8 (`to_unit_range` maps them to [-1, 1] on the device: a quarter of the
    bytes through the loader, as core.preprocess.Collate); captions tokenised to the full length, as
    the sampler will tokenise prompts (Stable Diffusion's U-Net attends over every position, padding
    included)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        batch: Batch = {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "keys": [s["key"] for s in samples],
            "skipped": sum(s.get("skipped", 0) for s in samples),
            "valid": torch.tensor([s.get("valid", True) and not s.get("substitute", False) for s in samples]),
            "index": torch.tensor([s.get("index", -1) for s in samples]),
        }
        if self.tokenizer is not None:
            batch["input_ids"] = self.tokenize([s.get("text", "") for s in samples])
        return batch

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids


def to_unit_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels → [-1, 1] in `dtype`, on their device (Stable Diffusion's VAE input)."""
    return pixels.float().div_(127.5).sub_(1).to(dtype)


def check_decode(decode: str) -> None:
    """The diffusion tasks decode in the loader workers (their square crops have no device path)."""
    if decode != "cpu":
        raise UserError(f"data.decode={decode}: only the CLIP tasks decode on the GPU; use data.decode=cpu")


def check_captions(manifest: Manifest, split: str) -> None:
    first = next(read_split(manifest, split), None)
    if first is None or not captions_of(first):
        raise UserError(
            f'{manifest.root / "manifest.json"}: split {split!r} has no captions (txt or json "captions"): '
            "text-to-image training needs them"
        )
