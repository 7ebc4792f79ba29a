"""Benchmark: data_prep on a user's own data against the work it cannot avoid, in the same run.

    python -m bench.prep [--images 2000] [--repeat 5] [--out FILE]

Input: ~2,000 synthetic 640×480 JPEGs (COCO's size) and an open_clip table (`filepath<TAB>title`).

* Floor (the least prep must do, the plain way, one process): read each JPEG, write the same bytes in
  shards of the same size through the project's tar writer (plumbing.tars), sha256 each shard.
  Target: `data_prep csv` (one task) ≥ 0.8 of its images/s.
* Tasks: `data_prep csv --tasks 2` (both tasks at once, then `merge`) against one task, on this machine.
  Target ≥ 1.6×. The floor in two processes (each half the files) is the machine's own parallel-copy
  speed-up, reported beside it: a VM whose two cores do not double a plain copy cannot double prep.
* Index: `data_prep index` of img2dataset-layout shards (the csv run's) against sha256 of the same files.
* Decode: what one loader core turns into CLIP input per second (core.shards.decode + the trainer's
  evaluation transform at 224 px), from the original JPEGs and from `--image-size 256` ones.

Every run forks from this process (same imports, same start-up) and runs take turns, best of `repeat`
after an untimed warm-up. Writes bench/results/prep-<cpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import Target, machine, slug, write_results
from core.manifest import load_manifest
from core.preprocess import ImageTransform
from core.shards import decode, read_split
from data_prep.cli import main as prep_main
from plumbing.files import sha256_file
from plumbing.tars import write_tar

SIZE = (640, 480)


def make_input(root: Path, n: int) -> Path:
    """640×480 JPEGs with smooth content and some texture (~COCO's size), and their table."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    rows = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1).astype(
            np.float32
        )
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = rng.integers(0, SIZE[0] - 60), rng.integers(0, SIZE[1] - 50)
            draw.ellipse((x, y, x + 60, y + 50), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        name = f"{i:06d}.jpg"
        image.save(images / name, format="JPEG", quality=90)
        rows.append(f"images/{name}\tpicture {i}: coloured ellipses on stripes\n")
    (root / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    return root / "train.tsv"


def floor(files: list[Path], out: Path, shard_size: int) -> int:
    """The same bytes, in shards of the same size, through the project's tar writer, each shard then
    hashed: what prep must do at the least."""
    out.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(files), shard_size)):
        shard = out / f"shard-{index:06d}.tar"
        write_tar(str(shard), [(p.name, p.read_bytes()) for p in files[start : start + shard_size]])
        sha256_file(shard)
    return len(files)


def prep(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = prep_main([*argv, "--quiet"])
    if code != 0:
        raise SystemExit(f"data_prep {' '.join(argv)} failed")


def forked(*calls: Callable[[], object]) -> None:
    """Run the calls in forked processes at once and wait for all (what N tasks on one machine are)."""
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=call) for call in calls]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a forked run exited {p.exitcode}")


def samples_in(out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["splits"].values())


def best_rates(runs: dict[str, Callable[[Path], int]], scratch: Path, repeat: int) -> dict[str, float]:
    """Best items/s of each run after an untimed warm-up round (page cache); the runs take turns so
    that page-cache writeback hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(-1, repeat):
        for name, run in runs.items():
            target = scratch / f"{name}-{i}"
            start = time.perf_counter()
            n = run(target)
            if i >= 0:
                rates[name].append(n / (time.perf_counter() - start))
            shutil.rmtree(target, ignore_errors=True)
    return {name: max(r) for name, r in rates.items()}


def decode_rate(manifest: Path, count: int) -> float:
    """Samples/s one core decodes and turns into CLIP input (the trainer's evaluation transform)."""
    transform = ImageTransform(224, (224, 224))
    raw = [s for s, _ in zip(read_split(load_manifest(manifest), "train"), range(count))]
    rng = random.Random(0)
    start = time.perf_counter()
    for sample in raw:
        transform(decode(sample)["image"], rng)
    return len(raw) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--shard-size", type=int, default=200, help="10 shards of 200: enough for 2 tasks to share"
    )
    parser.add_argument("--decode", type=int, default=300, help="images decoded per loader-core measurement")
    parser.add_argument("--out", default="", help="results file (default bench/results/prep-<cpu>.json)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = make_input(root / "input", args.images)
        files = sorted((root / "input" / "images").glob("*.jpg"))
        mb = sum(p.stat().st_size for p in files) / 2**20
        csv = ["csv", "--source", str(table), "--shard-size", str(args.shard_size)]

        def one(out: Path) -> int:
            forked(lambda: prep(*csv, "--out", str(out)))
            return samples_in(out)

        def two(out: Path) -> int:
            forked(
                *(lambda k=k: prep(*csv, "--out", str(out), "--tasks", "2", "--task", str(k)) for k in (0, 1))
            )
            prep("merge", "--out", str(out))
            return samples_in(out)

        def workers2(out: Path) -> int:
            forked(lambda: prep(*csv, "--out", str(out), "--workers", "2"))
            return samples_in(out)

        def floor_one(out: Path) -> int:
            forked(lambda: floor(files, out, args.shard_size))
            return len(files)

        def floor_two(out: Path) -> int:
            half = len(files) // 2
            forked(
                lambda: floor(files[:half], out / "a", args.shard_size),
                lambda: floor(files[half:], out / "b", args.shard_size),
            )
            return len(files)

        shards = root / "img2dataset"  # the csv output's shards, as a folder of shards to index
        prep(*csv, "--out", str(shards))
        splits = [s for s in ("train", "dev", "test") if any((shards / s).glob("*.tar"))]

        def hashed(out: Path) -> int:
            forked(lambda: [sha256_file(p) for s in splits for p in sorted((shards / s).glob("*.tar"))])
            return samples_in(shards)

        def index(out: Path) -> int:
            patterns = [w for s in splits for w in ("--shards", str(shards / s), "--split", s)]
            forked(lambda: prep("index", *patterns, "--out", str(out)))
            return samples_in(out)

        rates = best_rates(
            {
                "floor": floor_one,
                "floor_two": floor_two,
                "one": one,
                "two": two,
                "workers2": workers2,
                "hash": hashed,
                "index": index,
            },
            root,
            args.repeat,
        )
        small = root / "small"
        prep(*csv, "--out", str(small), "--image-size", "256")
        decoded = {
            "original": decode_rate(shards / "manifest.json", args.decode),
            "256": decode_rate(small / "manifest.json", args.decode),
        }
        small_kb = (
            sum(
                s["bytes"]
                for s in json.loads((small / "manifest.json").read_text())["splits"]["train"]["shards"]
            )
            / 2**10
        )
        small_kb /= samples_in(small) or 1
    rates.update({f"decode_{k}": v for k, v in decoded.items()})
    load = (load_before, os.getloadavg()[0])  # other processes on the same cores skew the parallel rows
    targets = [
        Target("data_prep csv, 1 task / floor", rates["one"] / rates["floor"], 0.8),
        Target("data_prep csv, 2 tasks + merge / 1 task", rates["two"] / rates["one"], 1.6),
        Target("data_prep index / sha256 of the shards", rates["index"] / rates["hash"], 0.8),
    ]
    text = "\n".join(
        [
            f"input: {args.images} JPEGs {SIZE[0]}×{SIZE[1]}, {mb:.0f} MiB, shards of {args.shard_size}, best of {args.repeat}",
            f"{'run':52s} {'images/s':>10s}",
            f"{'floor: tar writer + sha256, 1 process':52s} {rates['floor']:10.0f}",
            f"{'floor: 2 processes, half the files each':52s} {rates['floor_two']:10.0f}",
            f"{'data_prep csv, 1 task':52s} {rates['one']:10.0f}",
            f"{'data_prep csv, 2 tasks at once + merge':52s} {rates['two']:10.0f}",
            f"{'data_prep --workers 2 (csv, one process)':52s} {rates['workers2']:10.0f}",
            f"{'sha256 of the shards':52s} {rates['hash']:10.0f}",
            f"{'data_prep index (the same shards, in place)':52s} {rates['index']:10.0f}",
            f"{'one loader core: decode + CLIP transform, 640×480':52s} {decoded['original']:10.0f}",
            f"{f'one loader core: the same at 256 px ({small_kb:.0f} KiB)':52s} {decoded['256']:10.0f}",
            f"the machine's own parallel-copy speed-up (floor, 2 processes / 1): {rates['floor_two'] / rates['floor']:.3f}",
            f"load average at the start and the end: {load[0]:.1f}, {load[1]:.1f} ({os.cpu_count()} cores)",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    path = write_results(f"prep-{slug(machine()['cpu'])}", rates, targets, text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
