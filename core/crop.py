"""A picture's crop, planned from its size alone (a JPEG header gives it) and carried out on either
side: in PIL by a loader worker, at the smallest JPEG decode that keeps the output's resolution, or
with torch on the device that decoded the JPEG (core.jpeg)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.shards import rgb


@dataclass(frozen=True)
class Crop:
    """Where a picture's pixels come from and where they go: a region of the source (in its own pixels,
    fractional), the output size, and whether to flip it. Planned from the image's size alone (a JPEG
    header gives it), so that the decoding can be told how small it may be, or be done elsewhere."""

    box: tuple[float, float, float, float]  # left, top, right, bottom in the source's pixels
    size: tuple[int, int]  # width, height of the output
    flip: bool

    def reduced(self, source: tuple[int, int]) -> tuple[int, int]:
        """The smallest source size at which the box still holds the output's pixels: a reduced decode
        at or above it loses nothing the resize would have kept."""
        (left, top, right, bottom), (w, h) = self.box, self.size
        return math.ceil(source[0] * w / (right - left)), math.ceil(source[1] * h / (bottom - top))

    def apply(self, image: Image.Image) -> torch.Tensor:
        """The crop of a (lazily opened) PIL image as uint8 CHW: decoded at the smallest JPEG scale that
        keeps the output's resolution (Pillow's Image.draft, libjpeg's DCT scaling: a 640×480 photo
        for CLIP's 224 decodes at 320×240, a quarter of the pixels), resized once from the box
        (bicubic; Pillow's `box` reads past the box's edges as resizing the whole image would), then
        flipped. A decoded image, or one that is not a JPEG, is resized as it is."""
        source = image.size
        drafted = image.draft(None, self.reduced(source))  # None: already decoded, or not a JPEG
        image = rgb(image)
        factor = drafted[1][2] / source[0] if drafted else 1.0  # draft's box: the source at 1/scale
        left, top, right, bottom = (v * factor for v in self.box)
        image = image.resize(self.size, Image.Resampling.BICUBIC, box=(left, top, right, bottom))
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def resized(self, image: torch.Tensor) -> torch.Tensor:
        """The crop of a decoded uint8 CHW picture, with torch on its device: the box cut at whole
        pixels (PIL resamples its fractional edges: under a source pixel apart at the border), resized
        bicubic with antialiasing (torch's antialiased bicubic is PIL's filter, a = -0.5), rounded."""
        _, height, width = image.shape
        left, top, right, bottom = (round(v) for v in self.box)
        left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
        right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
        crop = image[None, :, top:bottom, left:right].float()
        w, h = self.size
        out = F.interpolate(crop, size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
        out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out.flip(-1) if self.flip else out
