"""Benchmark: what one loader core turns into CLIP input per second, against the JPEG decode it cannot
avoid, for the real recipe's inputs (COCO's 640×480 photos and 256 px JPEGs, to CLIP's 224), and how
many cores a GPU at a given rate needs.

    python -m bench.loader [--images 200] [--repeat 3] [--out FILE]

One process, one thread (a loader worker's share of a core); every row runs the same samples, rows
take turns, best of `--repeat` after an untimed pass. Rows, per input size:

- floor: libjpeg's decode of the whole picture (Pillow, `Image.load`), and at the smallest DCT scale
  that keeps the crop's resolution (Pillow's `Image.draft`: 640×480 decodes at 320×240 for 224);
- before: the worker's transform as it was (full decode, the whole picture resized, then cut);
- data.decode=cpu: the worker's transform now (reduced decode, one resize of the crop's box), and the
  whole worker path (decode, CLIP's train transform with random crop and flip, a caption, the collate
  with its tokenizer, per batch of 64);
- data.decode=gpu: the whole worker path when the device decodes (header, crop plan, JPEG bytes
  packed), and the device's share run on this CPU (torchvision's decode_jpeg and the crop's resize;
  nvJPEG does that part on a GPU).

Targets: the worker's transform at least 1.5× the one before on 640×480 (at 256 px no smaller JPEG
scale keeps 224 px: only the cut part's resize is saved); the whole decode=cpu worker path at least 0.8
of its pixel work alone (reduced decode and one bicubic resize, the least the recipe needs with Pillow:
at 256 px the resize costs as much as the decode), so that captions, tokenizer and collate cost at most
a fifth. Cores per GPU = samples/s the GPU trains at / samples/s of one core (data-wait ≤ 5 % needs
that many, plus headroom). Writes bench/results/loader-<cpu>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import Target, machine, slug, write_results
from bench.prep import make_input
from core import jpeg
from core.clip import load_processors
from core.preprocess import Collate, ImageTransform
from core.presets import TinyConfig, build_clip
from core.shards import decode
from trainer.data import decode_or_substitute
from trainer.tasks.clip.tasks import ClipPrep

BATCH = 64
RATES = (664, 2500, 5000)  # the H200's ViT-B/32 of 2026-12-04; halfway; ViT-B/32 at 15 % MFU (~5,000)
Sample = dict[str, Any]


def inputs(root: Path, count: int) -> dict[str, list[Sample]]:
    """Raw samples as a shard holds them: 640×480 photo-like JPEGs (bench.prep's), and the same pictures
    with the short side at 256 (data_prep --image-size 256), quality 90, one caption each."""
    table = make_input(root, count)
    out: dict[str, list[Sample]] = {"640×480": [], "256 px": []}
    for i, line in enumerate(table.read_text().splitlines()[1:]):
        path, caption = line.split("\t")
        data = (root / path).read_bytes()
        small = Image.open(io.BytesIO(data))
        small = small.resize((round(small.width * 256 / small.height), 256), Image.Resampling.BICUBIC)
        encoded = io.BytesIO()
        small.save(encoded, "JPEG", quality=90)
        meta = json.dumps({"captions": [caption]}).encode()
        out["640×480"].append({"__key__": f"{i:06d}", "jpg": data, "json": meta})
        out["256 px"].append({"__key__": f"{i:06d}", "jpg": encoded.getvalue(), "json": meta})
    return out


def before(transform: ImageTransform) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """The evaluation transform as the worker ran it before: decoded whole, resized whole, then cut."""
    ch, cw = transform.crop

    def run(image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = transform.size / min(w, h)
        w, h = max(cw, round(w * scale)), max(ch, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = round((w - cw) / 2), round((h - ch) / 2)
        image = image.crop((left, top, left + cw, top + ch))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    return run


def rows(processor: Any, tokenizer: Any) -> dict[str, Callable[[list[Sample]], object]]:
    """Each row: a function over the raw samples, one pass."""
    evaluation = ImageTransform.of(processor)
    train = ImageTransform.of(processor, random_crop=True, scale_min=0.8, hflip=True)
    old = before(evaluation)
    collate = Collate(tokenizer, 77, True, processor)

    def worker(on_device: bool) -> Callable[[list[Sample]], object]:
        prep = ClipPrep(train, evaluation, "draw", on_device)
        stage = lambda s: prep(s, hash(s["key"]) & 0xFFFF, True)  # noqa: E731
        return lambda raw: [
            collate(batch)
            for samples in [list(decode_or_substitute(iter(raw), stage))]
            for batch in (samples[i : i + BATCH] for i in range(0, len(samples), BATCH))
        ]

    def reduced(sample: Sample) -> None:
        image = decode(sample)["image"]
        image.draft(None, evaluation.plan(image.size, random.Random(0)).reduced(image.size))
        image.load()

    def device_share(raw: list[Sample]) -> object:
        for batch in worker(True)(raw):
            jpeg.pixels(batch, "cpu")
        return None

    return {
        "floor: libjpeg, whole picture": lambda raw: [decode(s)["image"].load() for s in raw],
        "floor: libjpeg at the crop's DCT scale": lambda raw: [reduced(s) for s in raw],
        "before: whole decode, whole resize, cut": lambda raw: [
            old(decode(s)["image"], random.Random(0)) for s in raw
        ],
        "cpu: reduced decode, one resize (eval)": lambda raw: [
            evaluation(decode(s)["image"], random.Random(0)) for s in raw
        ],
        "cpu: whole worker path (train, collate)": worker(False),
        "gpu: whole worker path (header, plan, bytes)": worker(True),
        "gpu: the device's share, run on this CPU": device_share,
    }


def measure(
    runs: dict[str, Callable[[list[Sample]], object]], raw: list[Sample], repeat: int
) -> dict[str, float]:
    """Samples/s of each row on one thread: best of `repeat` passes after an untimed one, rows in turn."""
    best = {name: 0.0 for name in runs}
    for run in runs.values():
        run(raw[: BATCH // 2])
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run(raw)
            best[name] = max(best[name], len(raw) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="", help="results file (default bench/results/loader-<cpu>.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_clip(root / "clip", "tiny", TinyConfig(image_size=224, patch_size=32))
        tokenizer, processor = load_processors(str(root / "clip"))
        data = inputs(root / "pictures", args.images)
        runs = rows(processor, tokenizer)
        rates = {size: measure(runs, raw, args.repeat) for size, raw in data.items()}
        kib = {size: sum(len(s["jpg"]) for s in raw) / len(raw) / 2**10 for size, raw in data.items()}
    lines = [f"one loader core (1 thread), samples/s, best of {args.repeat}; {args.images} pictures per size"]
    lines.append(f"  {'':46s} " + " ".join(f"{f'{s} ({kib[s]:.0f} KiB)':>20s}" for s in rates))
    for name in runs:
        lines.append(f"  {name:46s} " + " ".join(f"{rates[s][name]:20.0f}" for s in rates))
    whole = "cpu: whole worker path (train, collate)"
    for size, r in rates.items():
        cores = ", ".join(f"{rate}/s: {rate / r[whole]:.1f}" for rate in RATES)
        deferred = ", ".join(
            f"{rate}/s: {rate / r['gpu: whole worker path (header, plan, bytes)']:.1f}" for rate in RATES
        )
        lines.append(f"  cores per GPU, {size}: data.decode=cpu {cores}; data.decode=gpu {deferred}")
    transform, old = "cpu: reduced decode, one resize (eval)", "before: whole decode, whole resize, cut"
    lines.append(
        "  transform now / before: "
        + ", ".join(f"{size} {r[transform] / r[old]:.2f}×" for size, r in rates.items())
        + "; the transform's share of the whole worker path: "
        + ", ".join(f"{size} {r[whole] / r[transform]:.0%}" for size, r in rates.items())
    )
    targets = [
        Target("640×480: transform now / before", rates["640×480"][transform] / rates["640×480"][old], 1.5),
        *[
            Target(f"{size}: worker path / its pixel work alone", r[whole] / r[transform], 0.8)
            for size, r in rates.items()
        ],
    ]
    text = "\n".join([*lines, *[t.line() for t in targets]])
    print(text)
    name = f"loader-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, {'samples_per_s': rates, 'kib': kib}, targets, text, args.out)}")


if __name__ == "__main__":
    main()
