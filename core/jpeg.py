"""Pictures decoded where the model runs (`data.decode=gpu`): the loader's workers read each JPEG's
header, plan its crop (core.preprocess.Crop, from the sample's own generator as ever) and pass the
encoded bytes; the training process decodes the whole batch on its device — nvJPEG on a GPU, through
`torchvision.io.decode_jpeg(list, device="cuda")`, which decodes a list in one batched call — and
resizes each crop there (bicubic, antialiased: torch's is PIL's filter). A worker then costs a header
parse instead of a decode and a resize, and the bytes it hands over are the JPEG's, a tenth of the
pixels'. Without a GPU the same code decodes with torchvision's libjpeg on the CPU (what the tests run).

The pixels agree with the workers' PIL path within rounding and the crop's sub-pixel edges
(tests/test_core.py holds them within a tolerance). A picture that is not a baseline-decodable JPEG
(PNG, WebP, CMYK) is decoded by its worker as before; one that nvJPEG refuses is replaced by the
batch's first good picture and its caption, counted as skipped, as the workers replace theirs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from core.crop import Crop

log = logging.getLogger("core.jpeg")
FIELDS = ("pixel_values", "jpeg", "jpeg_sizes", "jpeg_at", "jpeg_box", "jpeg_flip")
PER_SAMPLE = ("input_ids", "attention_mask", "labels")  # what a replaced picture's row copies too


def deferrable(image: Image.Image, data: bytes) -> bool:
    """Whether the device can decode it: a whole JPEG (it ends with its end-of-image marker: a
    truncated one is the worker's to decode, fail on and replace) in colour or grey."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9")


def pack(samples: list[dict[str, Any]], size: tuple[int, int]) -> dict[str, Any]:
    """A batch's pictures: pixels decoded by the workers (zeros where a JPEG waits), and the JPEGs'
    bytes in one tensor (one shared-memory block per batch, not one per picture) with their crops."""
    w, h = size
    waiting = [(i, s["jpeg"]) for i, s in enumerate(samples) if "jpeg" in s]
    blank = torch.zeros(3, h, w, dtype=torch.uint8)
    out: dict[str, Any] = {"pixel_values": torch.stack([s.get("pixel_values", blank) for s in samples])}
    if waiting:
        blobs: list[bytes] = [data for _, (data, _) in waiting]
        crops: list[Crop] = [crop for _, (_, crop) in waiting]
        out["jpeg"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        out["jpeg_sizes"] = torch.tensor([len(b) for b in blobs])
        out["jpeg_at"] = torch.tensor([i for i, _ in waiting])
        out["jpeg_box"] = torch.tensor([c.box for c in crops], dtype=torch.float64)
        out["jpeg_flip"] = torch.tensor([c.flip for c in crops])
    return out


def pixels(batch: dict[str, Any], device: str | torch.device) -> torch.Tensor:
    """The batch's uint8 NCHW pixels on `device`, its JPEGs decoded and cropped there. A picture that
    does not decode takes the first good one's pixels and caption (counted in batch["skipped"])."""
    out = batch["pixel_values"].to(device, non_blocking=True)
    if "jpeg" not in batch:
        return out
    h, w = out.shape[-2:]
    parts = list(torch.split(batch["jpeg"], batch["jpeg_sizes"].tolist()))
    decoded = decode(parts, device)
    places, boxes, flips = batch["jpeg_at"].tolist(), batch["jpeg_box"].tolist(), batch["jpeg_flip"].tolist()
    good: int | None = None
    for at, image, box, flip in zip(places, decoded, boxes, flips, strict=True):
        if image is not None:
            out[at] = Crop(tuple(box), (w, h), flip).resized(image)
            good = at if good is None else good
    for at, image in zip(places, decoded, strict=True):
        if image is None:
            if good is None:
                raise ValueError(f"no picture of a batch decodes (keys {batch['keys'][:3]}…)")
            log.warning(
                "skipping undecodable picture %s (replaced by %s)", batch["keys"][at], batch["keys"][good]
            )
            out[at] = out[good]
            for key in PER_SAMPLE:
                if key in batch:
                    batch[key][at] = batch[key][good]
            batch["skipped"] += 1
    return out


def decode(parts: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 CHW RGB on `device`, in one batched call; if that fails, one at a time,
    None for each that fails alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(parts, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for part in parts:
            try:
                out.append(decode_jpeg(part, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
