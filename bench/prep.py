"""Benchmark: data_prep flickr8k against the work it cannot avoid, in the same run.

    python -m bench.prep [--images 2000] [--repeat 7] [--out FILE]

Input: ~2,000 synthetic ~500 px JPEGs in the extracted Flickr8k layout (Flicker8k_Dataset/,
Flickr8k.token.txt, split lists). Baseline (the floor of what prep must do, done the plain way in
one process): read each JPEG, write the same bytes in shards of the same size through the project's
own tar writer (plumbing.tars), and sha256 each shard. Targets: data_prep --workers 1 reaches ≥ 0.8
of the baseline's images/s; --workers 2 is ≥ 1.6× --workers 1. Writes bench/results/prep-<cpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import Target, machine, slug, write_results
from data_prep.cli import main as prep_main
from plumbing.files import sha256_file
from plumbing.tars import write_tar


def make_input(root: Path, n: int) -> Path:
    """~500×375 JPEGs with smooth content and some texture, the size of real Flickr8k photos."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{1000000000 + i * 7919}_{i:010x}.jpg" for i in range(n)]
    yy, xx = np.mgrid[0:375, 0:500]
    for i, name in enumerate(names):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1).astype(
            np.float32
        )
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 450), rng.integers(0, 330)
            draw.ellipse((x, y, x + 50, y + 40), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        (images / name).write_bytes(out.getvalue())
    tokens = "".join(
        f"{name}#{k}\tcaption {k} of image {i} .\n" for i, name in enumerate(names) for k in range(5)
    )
    (root / "Flickr8k.token.txt").write_text(tokens)
    cut = [int(n * 0.75), int(n * 0.875)]
    for split, part in zip(("train", "dev", "test"), np.split(np.array(names), cut)):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(part) + "\n")
    return images


def baseline(images: Path, out: Path, shard_size: int) -> int:
    """The same bytes, in shards of the same size, through the project's tar writer, each shard then
    hashed: what prep must do at the least, in one process."""
    files = sorted(images.glob("*.jpg"))
    out.mkdir(parents=True)
    for index, start in enumerate(range(0, len(files), shard_size)):
        shard = out / f"shard-{index:06d}.tar"
        write_tar(str(shard), [(p.name, p.read_bytes()) for p in files[start : start + shard_size]])
        sha256_file(shard)
    return len(files)


def ours(images: Path, captions: Path, out: Path, workers: int, shard_size: int) -> int:
    argv = ["flickr8k", "--images", str(images), "--captions", str(captions), "--out", str(out)]
    argv += ["--workers", str(workers), "--shard-size", str(shard_size), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = prep_main(argv)
    if code != 0:
        raise SystemExit("data_prep failed")
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["splits"].values())


def best_rates(runs: dict[str, Callable[[Path], int]], scratch: Path, repeat: int) -> dict[str, float]:
    """Best images/s of each run after an untimed warm-up round (imports, page cache); the runs take
    turns so that page-cache writeback hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(-1, repeat):
        for name, run in runs.items():
            target = scratch / f"{name}-{i}"
            start = time.perf_counter()
            n = run(target)
            if i >= 0:
                rates[name].append(n / (time.perf_counter() - start))
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return {name: max(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--shard-size", type=int, default=200, help="10 shards of 200: enough for 2 workers to share"
    )
    parser.add_argument("--out", default="", help="results file (default bench/results/prep-<cpu>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = make_input(root / "flickr", args.images)
        captions = root / "flickr" / "Flickr8k.token.txt"
        mb = sum(p.stat().st_size for p in images.glob("*.jpg")) / 2**20
        rates = best_rates(
            {
                "base": lambda o: baseline(images, o, args.shard_size),
                "one": lambda o: ours(images, captions, o, 1, args.shard_size),
                "two": lambda o: ours(images, captions, o, 2, args.shard_size),
            },
            root,
            args.repeat,
        )
    base, one, two = rates["base"], rates["one"], rates["two"]
    targets = [
        Target("data_prep --workers 1 / baseline", one / base, 0.8),
        Target("data_prep --workers 2 / --workers 1", two / one, 1.6),
    ]
    text = "\n".join(
        [
            f"input: {args.images} JPEGs, {mb:.0f} MiB, shards of {args.shard_size}, best of {args.repeat}",
            f"{'run':40s} {'images/s':>10s}",
            f"{'baseline: project tar writer + sha256':40s} {base:10.0f}",
            f"{'data_prep --workers 1':40s} {one:10.0f}",
            f"{'data_prep --workers 2':40s} {two:10.0f}",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    path = write_results(f"prep-{slug(machine()['cpu'])}", rates, targets, text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
